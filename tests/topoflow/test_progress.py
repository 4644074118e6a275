"""topoflow.progress: a tqdm bar on a terminal, plain rate-limited log lines in a batch log, nothing when disabled."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig
from tests.helpers import REPO
from topoflow.progress import format_duration, progress_bar

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO "


class Clock:
    """A fake clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _messages(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_batch_lines_are_rate_limited_and_carry_counter_rate_eta_and_postfix(caplog: pytest.LogCaptureFixture,
                                                                             capsys: pytest.CaptureFixture) -> None:
    clock, log = Clock(), logging.getLogger("tests.progress.batch")
    with caplog.at_level(logging.INFO, logger=log.name), \
            progress_bar(100, initial=10, desc="fit", unit="step", log=log, clock=clock, interval=30,
                         isatty=lambda: False) as bar:
        for k in range(1, 91):  # one step a second, resumed at step 10
            clock.t = k
            bar.update(1)
            if k == 35:
                bar.set_postfix(val_loss="0.1532")
    assert _messages(caplog, log.name) == [
        "fit: step 10/100 (10%)",
        "fit: step 40/100 (40%), 1 step/s, ETA 1m00s",  # 30 s after the first line: 30 steps in 30 s
        "fit: step 70/100 (70%), 1 step/s, ETA 30s, val_loss=0.1532",  # the postfix waited for the next line
        "fit: step 100/100 (100%), 1 step/s, done in 1m30s, val_loss=0.1532",  # once, from close()
    ]
    assert "\r" not in capsys.readouterr().err


def test_slow_unknown_and_stopped_work(caplog: pytest.LogCaptureFixture) -> None:
    clock, log = Clock(), logging.getLogger("tests.progress.slow")
    with caplog.at_level(logging.INFO, logger=log.name):
        with progress_bar(4, desc="build", unit="block", log=log, clock=clock, interval=30, isatty=lambda: False) as bar:
            clock.t = 45
            bar.update(1)
            clock.t = 50  # within the interval: no line
            bar.update(1)
        with progress_bar(None, desc="shard", unit="sample", log=log, clock=clock, interval=30,
                          isatty=lambda: False) as bar:
            clock.t += 4
            bar.update(10)
    assert _messages(caplog, log.name) == [
        "build: block 0/4 (0%)",
        "build: block 1/4 (25%), 45 s/block, ETA 2m15s",
        "build: block 2/4 (50%), 25 s/block, stopped after 50s",
        "shard: sample 0",
        "shard: sample 10, 2.5 sample/s, done in 4s",
    ]


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59.4, "59s"), (59.6, "1m00s"), (259, "4m19s"),
                                               (2 * 3600 + 5 * 60 + 29, "2h05m"), (3 * 86400 + 4 * 3600 + 59, "3d04h")])
def test_durations_read_as_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_terminal_bar_is_tqdm_with_log_records_above_it(caplog: pytest.LogCaptureFixture,
                                                        capsys: pytest.CaptureFixture) -> None:
    log = logging.getLogger("tests.progress.tty")
    console = logging.StreamHandler(sys.stderr)
    log.addHandler(console)
    try:
        with caplog.at_level(logging.INFO, logger=log.name), \
                progress_bar(3, desc="shard", unit="sample", log=log, isatty=lambda: True) as bar:
            assert console not in log.handlers  # redirected through tqdm.write while the bar is open
            bar.update(2)
            log.info("hello")
            bar.set_postfix(val_loss="0.5")
            bar.update(1)
        assert log.handlers == [console]
    finally:
        log.removeHandler(console)
    err = capsys.readouterr().err
    assert _messages(caplog, log.name) == ["hello"]  # the bar itself logs nothing
    assert "\rhello\n" in err  # the bar was cleared first: the record is not glued onto it
    assert re.search(r"\rshard: 100%\|.*\| 3/3 \[.*sample/s, val_loss=0\.5\]\n$", err), err


@pytest.mark.parametrize("tty", [True, False])
def test_disabled_shows_nothing(tty: bool, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    log = logging.getLogger("tests.progress.off")
    with caplog.at_level(logging.INFO, logger=log.name), \
            progress_bar(5, desc="fit", log=log, enabled=False, isatty=lambda: tty) as bar:
        bar.update(5)
        bar.set_postfix(val_loss="0.5")
    assert caplog.records == [] and capsys.readouterr() == ("", "")


def test_cli_in_a_batch_job_logs_plain_timestamped_lines(tiny_store: PipelineConfig, tmp_path: Path) -> None:
    """`python -m pipeline shard` with stdout and stderr in a file, as under SLURM."""
    config = Path(tiny_store.data.store).parent / "tiny.yaml"
    out = tmp_path / "job.out"
    with open(out, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "shard", "--config", str(config),
                               "--set", f"data.shards={tmp_path / 'shards'}"], cwd=REPO, stdout=fh,
                              stderr=subprocess.STDOUT, check=False, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    text = out.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    lines = [line for line in text.splitlines() if re.match(STAMP + "shard: ", line)]
    assert re.fullmatch(STAMP + r"shard: sample 0/48 \(0%\)", lines[0]), text
    assert re.fullmatch(STAMP + r"shard: sample 48/48 \(100%\), [\d.]+ sample/s, done in \d+s", lines[-1]), text
    assert "train: 24 samples in 6 shards" in text  # the summary printed to stdout, in the same file
