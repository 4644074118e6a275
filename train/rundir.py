"""A run directory belongs to one run, and says which of its checkpoints are that run's best.

`run.json` (a `RunRecord`) holds the run id, the settings that fix the batch sequence, and the best-k
list. Best-k is read from that list, never from a glob, so a file left by another run, copied in or
renamed, is never picked up as "the best checkpoint". Each checkpoint carries the run id too.

- A fresh fit refuses a directory that already holds a run (suggesting `--resume` or a new run_dir).
- `--resume` continues from last.ckpt when it exists and starts the run afresh when the directory
  holds none yet (a job requeued before its first checkpoint): the same command line serves both.
- A best checkpoint is written before last.ckpt at the same step, so a kill between the two replays
  that step and rewrites the same best file: a resumed run lists exactly the uninterrupted run's.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from pathlib import Path
from typing import Any, Callable

from topoflow.config import Strict
from topoflow.errors import CheckpointError, OutputError
from topoflow.files import atomic_write_json

log = logging.getLogger("train")
LAST = "last.ckpt"
RUN_FILE = "run.json"
RUN_FILES = (RUN_FILE, LAST, "metrics.csv")  # any of these (or a best-*.ckpt) means a run lives here


class BestEntry(Strict):
    file: str
    val_loss: float
    step: int


class RunRecord(Strict):
    """What a run directory holds: whose run it is and which checkpoints are its best."""

    run_id: str
    started: str
    best: list[BestEntry] = []

    @classmethod
    def new(cls) -> "RunRecord":
        return cls(run_id=uuid.uuid4().hex[:12], started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES) or any(run_dir.glob("best-*.ckpt"))


def read_run(run_dir: Path) -> RunRecord:
    """The run record of `run_dir`; a CheckpointError naming the fix if there is none or it is unreadable."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} holds no {RUN_FILE}: it holds no run of this version of `python -m train "
                              "fit` (train one, or pass --checkpoint PATH)")
    try:
        return RunRecord.model_validate_json(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a run record ({exc}): pass --checkpoint PATH") from None


def write_run(run_dir: Path, record: RunRecord) -> None:
    atomic_write_json(run_dir / RUN_FILE, record.model_dump(mode="json"), sort_keys=False)


def start_run(run_dir: Path, resume: bool) -> tuple[RunRecord, bool]:
    """The run record to continue or a new one (written), and whether last.ckpt is to be restored."""
    if resume and (run_dir / LAST).is_file():
        if not (run_dir / RUN_FILE).is_file():
            raise OutputError(f"{run_dir} holds a last.ckpt but no {RUN_FILE}: an older version wrote it, and its best "
                              "checkpoints cannot be told from another run's. Move it away or set train.run_dir to a "
                              "new directory (for the demo: `make clean`)")
        return read_run(run_dir), True
    if not resume and holds_run(run_dir):
        raise OutputError(f"{run_dir} already holds a run (run.json, last.ckpt, best-*.ckpt or metrics.csv): pass "
                          "--resume to continue it, or set train.run_dir to a new directory (--set train.run_dir=...)")
    if resume:
        log.info("--resume: %s holds no last.ckpt yet, starting the run from step 0", run_dir)
        if (run_dir / RUN_FILE).is_file():
            for entry in read_run(run_dir).best:  # written before a first last.ckpt that never came
                (run_dir / entry.file).unlink(missing_ok=True)
    record = RunRecord.new()
    write_run(run_dir, record)
    return record, False


def best_name(val_loss: float, step: int) -> str:
    return f"best-val_loss={val_loss:.4f}-step={step}.ckpt"


def update_best(run_dir: Path, record: RunRecord, payload: dict[str, Any], val_loss: float, step: int, top_k: int,
                save: Callable[[dict[str, Any], Path], None]) -> Path | None:
    """Save `payload` as a best checkpoint if it ranks in the top k; list it in run.json, drop those pushed out.

    `save(payload, path)` writes a checkpoint atomically (passed in, so this module needs no torch).
    """
    ranked = sorted((e for e in record.best if e.step != step), key=lambda e: (e.val_loss, e.step))
    if top_k <= 0 or not math.isfinite(val_loss) or (len(ranked) >= top_k and val_loss >= ranked[top_k - 1].val_loss):
        return None
    entry = BestEntry(file=best_name(val_loss, step), val_loss=val_loss, step=step)
    save(payload, run_dir / entry.file)
    ranked = sorted([*ranked, entry], key=lambda e: (e.val_loss, e.step))
    record.best = ranked[:top_k]
    write_run(run_dir, record)
    for old in ranked[top_k:]:
        (run_dir / old.file).unlink(missing_ok=True)
    return run_dir / entry.file


def best_checkpoints(run_dir: Path) -> list[Path]:
    """This run's best checkpoints, lowest val loss first (empty if it has none yet)."""
    return [run_dir / e.file for e in read_run(run_dir).best] if (run_dir / RUN_FILE).is_file() else []


def default_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint, else its last.ckpt; a CheckpointError if the directory holds no run."""
    if not (run_dir / RUN_FILE).is_file() and not (run_dir / LAST).is_file():
        raise CheckpointError(
            f"no checkpoint in {run_dir}: run `python -m train fit --config CONFIG` first or pass --checkpoint PATH")
    best = best_checkpoints(run_dir)
    return best[0] if best else run_dir / LAST


def check_run_id(ckpt: dict[str, Any], run_dir: Path, path: Path) -> None:
    """Refuse a checkpoint in `run_dir` that another run wrote (copied or renamed into place)."""
    expected = read_run(run_dir).run_id
    if ckpt.get("run_id") != expected:
        raise CheckpointError(f"{path} was written by run {ckpt.get('run_id')!r}, but {run_dir / RUN_FILE} is run "
                              f"{expected!r}: it is not this run's checkpoint; pass it with --checkpoint if you mean it, "
                              "or train into a new run_dir")
