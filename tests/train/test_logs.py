"""train.logs.ScalarLog: grouped TensorBoard tags and CSV columns from one declaration, losses named by units."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train.logs import ScalarLog

TRAIN_ROW = {"epoch": 0, "train_loss": 0.25, "lr": 1e-3, "grad_norm": 2.0, "samples_per_s": 40.0, "alpha/blocks.0": -1.5}


def _csv(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _two_steps(run_dir: Path, residual: bool) -> None:
    scalars = ScalarLog(run_dir, ["blocks.0"], None, residual=residual, targets=["pm25"])
    scalars.write({"step": 1, **TRAIN_ROW})
    scalars.write({"step": 2, **TRAIN_ROW, "train_loss": 0.125})
    scalars.write({"step": 2, "epoch": 0, "val_loss": 0.5, "val_rmse/pm25": 12.5})
    scalars.close()


def test_residual_run_logs_grouped_tags_and_the_loss_in_change_units(tmp_path: Path) -> None:
    _two_steps(tmp_path, residual=True)
    columns, rows = _csv(tmp_path)
    assert columns == ["step", "epoch", "train_loss_norm_change", "val_loss_norm_state", "train_lr", "train_grad_norm",
                       "train_samples_per_s", "train_alpha_blocks.0", "val_rmse_pm25"]
    assert [(r["step"], r["train_loss_norm_change"], r["val_loss_norm_state"], r["val_rmse_pm25"]) for r in rows] == \
        [("1", "0.25", "", ""), ("2", "0.125", "", ""), ("2", "", "0.5", "12.5")]
    assert rows[0]["train_alpha_blocks.0"] == "-1.5" and rows[0]["train_lr"] == "0.001"
    tb = _tensorboard(tmp_path)
    assert sorted(tb) == ["train/alpha/blocks.0", "train/grad_norm", "train/loss_norm_change", "train/lr",
                          "train/samples_per_s", "val/loss_norm_state", "val/rmse/pm25"]
    assert tb["val/rmse/pm25"] == [(2, 12.5)]
    assert tb["train/loss_norm_change"] == [(1, 0.25), (2, 0.125)]
    assert tb["val/loss_norm_state"] == [(2, 0.5)]
    assert tb["train/alpha/blocks.0"] == [(1, -1.5), (2, -1.5)]


def test_state_run_names_its_training_loss_by_state_units(tmp_path: Path) -> None:
    _two_steps(tmp_path, residual=False)
    columns, rows = _csv(tmp_path)
    assert columns[2:4] == ["train_loss_norm_state", "val_loss_norm_state"]
    assert [r["train_loss_norm_state"] for r in rows] == ["0.25", "0.125", ""]
    assert _tensorboard(tmp_path)["train/loss_norm_state"] == [(1, 0.25), (2, 0.125)]


def test_resume_drops_rows_after_the_checkpoint_and_old_columns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "metrics.csv").write_text("step,epoch,train_loss,train_lr\n1,0,0.9,0.1\n2,0,0.8,0.1\n3,0,0.7,0.1\n")
    with caplog.at_level(logging.WARNING, logger="train"):
        scalars = ScalarLog(tmp_path, [], 2, residual=True)
    scalars.write({"step": 3, "epoch": 0, "train_loss": 0.6})
    scalars.close()
    columns, rows = _csv(tmp_path)
    assert columns == ["step", "epoch", "train_loss_norm_change", "val_loss_norm_state", "train_lr", "train_grad_norm",
                       "train_samples_per_s"]
    assert [(r["step"], r["train_lr"], r["train_loss_norm_change"]) for r in rows] == \
        [("1", "0.1", ""), ("2", "0.1", ""), ("3", "", "0.6")]
    assert "columns ['train_loss'] of the earlier rows" in caplog.text


def test_an_undeclared_scalar_is_refused(tmp_path: Path) -> None:
    scalars = ScalarLog(tmp_path, [], None, residual=False)
    with pytest.raises(ValueError, match=r"\['val_los'\] are not declared"):
        scalars.write({"step": 1, "epoch": 0, "val_los": 0.5})
    scalars.close()
