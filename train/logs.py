"""What a run logs: text (stderr and run_dir/train.log, rank 0) and scalars (CSV + TensorBoard)."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from topoflow.files import atomic_write_bytes, writing
from topoflow.progress import LOG_FORMAT

log = logging.getLogger("train")
RUN_LOGGERS = ("train", "model", "topoflow")  # the packages whose records a run keeps


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """Rank 0 logs to stderr and run_dir/train.log; other ranks only warn. Replaces earlier handlers
    (several fits in one process, e.g. an ablation, each log to their own run_dir). The model's
    (checkpoint loading) and topoflow's (lock waits) records go to the same place as the trainer's."""
    handlers: list[logging.Handler] = []
    if is_main:
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            handlers = [logging.StreamHandler(), logging.FileHandler(run_dir / "train.log")]
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for logger in map(logging.getLogger, RUN_LOGGERS):
        logger.setLevel(logging.INFO if is_main else logging.WARNING)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            if old not in handlers:
                old.close()
        for handler in handlers:
            logger.addHandler(handler)


def scalar_tags(residual: bool, alpha_names: Sequence[str], targets: Sequence[str] = ()) -> dict[str, str]:
    """The one declaration of what a run logs: the caller's row key -> TensorBoard tag (`train/...`,
    `val/...`); the CSV column is the tag with `/` as `_` (`train/lr` -> `train_lr`).

    Losses are named by their units. Validation is the lat-weighted MSE of the normalised state
    ((x - mean) / std). A residual run trains on the change x[t+lead] - x[t] divided by its per-lead
    spread (change_std, train.residual), so its training loss is in other units and not comparable.
    `val/rmse/{target}` is each target's validation RMSE in the target's own units (ug m-3, ...).
    """
    return {"train_loss": "train/loss_norm_change" if residual else "train/loss_norm_state",
            "val_loss": "val/loss_norm_state", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "samples_per_s": "train/samples_per_s", **{f"alpha/{n}": f"train/alpha/{n}" for n in alpha_names},
            **{f"val_rmse/{t}": f"val/rmse/{t}" for t in targets}}


def csv_column(tag: str) -> str:
    """A TensorBoard tag as a CSV column name (one declaration, two spellings)."""
    return tag.replace("/", "_")


class ScalarLog:
    """CSV (run_dir/metrics.csv) + TensorBoard scalars, rank 0 only; columns fixed at start (`scalar_tags`).

    `write` takes rows keyed `step`, `epoch` and `scalar_tags`' keys; `residual` says whether the
    training loss is in normalised-change units (StepContext.scale is set) or normalised-state units.
    """

    def __init__(self, run_dir: Path, alpha_names: list[str], resume_step: int | None, *, residual: bool,
                 targets: Sequence[str] = ()) -> None:
        self.path = run_dir / "metrics.csv"
        self.tags = scalar_tags(residual, alpha_names, targets)
        self.columns = ["step", "epoch", *map(csv_column, self.tags.values())]
        rows = self._rows_until(resume_step) if resume_step is not None and self.path.is_file() else []
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, text.getvalue().encode())  # a kill here keeps the old rows
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def _rows_until(self, step: int) -> list[dict[str, str]]:
        """The old rows up to the resume step (a killed run wrote some after its checkpoint); columns that
        this run no longer has (another version or train.residual) are dropped, and said so."""
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = [r for r in reader if int(r["step"]) <= step]
        dropped = [c for c in reader.fieldnames or [] if c not in self.columns]
        if dropped and rows:
            log.warning("%s: columns %s of the earlier rows are not logged by this run and are dropped", self.path,
                        dropped)
        return rows

    def write(self, row: dict[str, Any]) -> None:
        """One row: `step`, `epoch` and any of the declared scalars (None or absent: not logged)."""
        unknown = sorted(set(row) - {"step", "epoch", *self.tags})
        if unknown:
            raise ValueError(f"scalars {unknown} are not declared in train.logs.scalar_tags")
        values = {self.tags[k]: v for k, v in row.items() if k in self.tags and v is not None}
        with writing(self.path, "then rerun fit with --resume"), open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.columns).writerow({"step": row["step"], "epoch": row.get("epoch", ""),
                                                       **{csv_column(t): v for t, v in values.items()}})
        for tag, value in values.items():
            self.tb.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        self.tb.close()
