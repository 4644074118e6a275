"""What a run logs: text (stderr and run_dir/train.log, rank 0) and scalars (CSV + TensorBoard)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from topoflow.files import atomic_write_bytes, writing

log = logging.getLogger("train")


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """Rank 0 logs to stderr and run_dir/train.log; other ranks only warn. Replaces earlier handlers
    (several fits in one process, e.g. an ablation, each log to their own run_dir)."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if is_main:
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(run_dir / "train.log")
        for handler in (logging.StreamHandler(), file_handler):
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)


class ScalarLog:
    """CSV (run_dir/metrics.csv) + TensorBoard scalars, rank 0 only; columns fixed at start."""

    def __init__(self, run_dir: Path, alpha_names: list[str], resume_step: int | None) -> None:
        self.path = run_dir / "metrics.csv"
        self.columns = ["step", "epoch", "train_loss", "val_loss", "lr", "grad_norm", "samples_per_s",
                        *[f"alpha/{n}" for n in alpha_names]]
        if resume_step is not None and self.path.is_file():  # drop rows the killed run wrote after its checkpoint
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        else:
            rows = []
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, text.getvalue().encode())  # a kill here keeps the old rows
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        with writing(self.path, "then rerun fit with --resume"), open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.columns).writerow({k: row.get(k, "") for k in self.columns})
        for key, value in row.items():
            if key not in ("step", "epoch") and value is not None:
                self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.tb.close()
