"""Preemption: SIGTERM/SIGUSR1 ends a fit after the current step with last.ckpt written and exit code 75,
and `--resume` then ends bit-identical to an uninterrupted run, in one process and under torchrun."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train.fit
from tests.helpers import REPO, write_config
from tests.kill import alive, descendants, kill_all
from tests.train.test_faults import _lock_free, assert_same_run
from train.__main__ import main
from train.checkpoint import load_checkpoint
from train.preempt import EXIT_PREEMPTED, STOP_SIGNALS

pytestmark = pytest.mark.slow


def _config(raw: dict, run_dir: Path, **train: object) -> Path:
    raw = copy.deepcopy(raw)
    raw["train"].update({"run_dir": str(run_dir), **train})
    return write_config(raw, run_dir.parent / f"{run_dir.name}.yaml")


@pytest.fixture(scope="module")
def preempt_raw(tiny_store, tiny_shards: Path) -> dict:
    """Loader workers, drop-path and gradient accumulation: everything a stop could desynchronise."""
    raw = tiny_store.model_dump(mode="json")
    raw["model"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "chunk_size": 16, "drop_path": 0.2}
    raw["train"] = {"max_steps": 6, "batch_size": 2, "eval_batch_size": 4, "num_workers": 2, "warmup_steps": 1,
                    "accumulate": 2, "val_every": 4, "checkpoint_every": 100, "log_every": 1, "save_top_k": 2,
                    "lr": 1e-3}
    return raw


@pytest.mark.parametrize("stop_signal", STOP_SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_ends_fit_after_the_step_and_resume_is_bit_identical(
        preempt_raw: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_signal: signal.Signals) -> None:
    reference = _config(preempt_raw, tmp_path / "ref")
    assert main(["fit", "--config", str(reference), "--no-progress"]) == 0

    calls = {"n": 0}
    real_loss = train.fit.training_loss

    def loss_then_signal(*args: object):  # noqa: ANN202 - the signal arrives in the 2nd micro-batch of step 2
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), stop_signal)
        return real_loss(*args)

    config = _config(preempt_raw, tmp_path / "run")
    monkeypatch.setattr(train.fit, "training_loss", loss_then_signal)
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    assert main(["fit", "--config", str(config), "--no-progress"]) == EXIT_PREEMPTED
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before  # handlers restored
    stopped = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert stopped["step"] == 2 and calls["n"] == 4  # the step in flight finished, no further batch was read
    assert f"stopped on {stop_signal.name} after step 2" in (tmp_path / "run" / "train.log").read_text()

    monkeypatch.setattr(train.fit, "training_loss", real_loss)
    assert main(["fit", "--config", str(config), "--no-progress", "--resume"]) == 0
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def _torchrun(config: Path, *extra: str) -> subprocess.Popen:
    """`torchrun --nproc_per_node=2 -m train fit`, its output in <config>.log (a pipe could fill and block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(config.with_suffix(".log"), "a") as out:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                                 "-m", "train", "fit", "--config", str(config), "--no-progress", *extra],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tree read from /proc")
def test_sigterm_to_torchrun_stops_both_ranks_cleanly_and_resume_is_bit_identical(
        preempt_raw: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(preempt_raw)
    raw["train"].update({"max_steps": 40, "accumulate": 1, "val_every": 20, "checkpoint_every": 1})
    reference = _config(raw, tmp_path / "ref")
    assert _torchrun(reference).wait(timeout=300) == 0, reference.with_suffix(".log").read_text()

    config = _config(raw, tmp_path / "run")
    launcher = _torchrun(config)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "last.ckpt").exists():  # step 1 is done: training is under way
            assert time.monotonic() < deadline and launcher.poll() is None, "torchrun did not start training"
            time.sleep(0.05)
        tree = descendants(launcher.pid)  # 2 ranks and their 2 loader workers each
        assert len(tree) >= 2
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in tree if alive(pid)], "a rank or loader worker outlived torchrun"
        assert _lock_free(tmp_path / "run")
        stopped = load_checkpoint(tmp_path / "run" / "last.ckpt")["step"]
        assert 1 <= stopped < 40, stopped
        assert f"after step {stopped}: last.ckpt is written" in (tmp_path / "run" / "train.log").read_text()
    finally:
        kill_all([launcher.pid, *tree])
    assert _torchrun(config, "--resume").wait(timeout=300) == 0, config.with_suffix(".log").read_text()
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def _fake_slurm(bin_dir: Path, requeues: Path) -> None:
    """`srun` runs its command here (as on one node), `torchrun` is torch's launcher, `scontrol` answers
    `show hostnames` and records `requeue`: enough to run scripts/slurm/train.sbatch outside SLURM."""
    bin_dir.mkdir()
    scripts = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"',
        "torchrun": f'exec "{sys.executable}" -m torch.distributed.run "$@"',
        "scontrol": f'if [[ "$1" == requeue ]]; then echo "$2" >> "{requeues}"; else echo localhost; fi',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash, fake SLURM commands")
def test_train_sbatch_requeues_a_stopped_run_and_not_a_finished_one(preempt_raw: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(preempt_raw)
    raw["train"].update({"max_steps": 30, "accumulate": 1, "val_every": 10, "checkpoint_every": 1})
    config, requeues = _config(raw, tmp_path / "run"), tmp_path / "requeued"
    _fake_slurm(tmp_path / "bin", requeues)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "2"}

    def job() -> subprocess.Popen:
        with open(tmp_path / "job.out", "a") as out:
            return subprocess.Popen(["bash", str(REPO / "scripts/slurm/train.sbatch"), str(config)], env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    first = job()
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "last.ckpt").exists():
        assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "job.out").read_text()
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends to the batch shell
    assert first.wait(timeout=120) == 0, (tmp_path / "job.out").read_text()
    assert requeues.read_text() == "4242\n"
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["step"] < 30

    assert job().wait(timeout=300) == 0, (tmp_path / "job.out").read_text()  # the requeued job
    assert requeues.read_text() == "4242\n"  # finished: not requeued again
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["step"] == 30
    log = (tmp_path / "job.out").read_text()
    assert "requeueing job 4242" in log and "resumed from" in log and "\r" not in log
