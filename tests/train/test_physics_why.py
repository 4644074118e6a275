"""The physics diagnostic (train/physics_why.py) on the session's fitted tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.config import load_experiment_config
from train.physics_why import main
from train.rundir import LAST


def test_diagnostic_reproduces_the_runs_val_loss_and_measures_the_barrier(evaluated_run: Path, tmp_path: Path) -> None:
    cfg = load_experiment_config(evaluated_run)
    run_dir = Path(cfg.train.run_dir)
    out = tmp_path / "why.json"
    main(["--config", str(evaluated_run), "--runs", str(run_dir), "--output", str(out)])
    (result,) = json.loads(out.read_text())
    ckpt = torch.load(run_dir / LAST, weights_only=True)
    # alpha x 1 is the model as trained: the val loss fit logged for its last checkpoint
    assert result["sensitivity"]["alpha_x1"] == pytest.approx(ckpt["val_loss"], rel=1e-5)
    assert result["sensitivity"]["alpha_x0"] != result["sensitivity"]["alpha_x1"]  # the bias acts on the output
    trained_alpha = float(ckpt["model"]["blocks.0.attn.physics.alpha"][0])
    assert result["alpha_path"]["blocks.0"][1] == pytest.approx(trained_alpha, abs=1e-6)
    assert 0.0 <= result["gradient"]["agreement"][0] <= 1.0
    probe = result["bias_vs_logits"]["blocks.0"]
    assert probe["bias_mean"] <= 0.0 and 0.0 <= probe["share_below_minus_1"] <= 1.0
    assert probe["bias_mean"] <= -probe["share_below_minus_1"]  # pairs below -1 alone give at least that mean
    assert (tmp_path / "why.md").read_text().count("\n") == 3  # header, rule, one run


def test_a_run_without_physics_is_refused(evaluated_run: Path, tmp_path: Path) -> None:
    from train.physics_why import diagnose

    cfg = load_experiment_config(evaluated_run)
    run_dir = Path(cfg.train.run_dir)
    ckpt = torch.load(run_dir / LAST, weights_only=True)
    if ckpt["config"]["model"]["physics"]["enabled"]:
        ckpt["config"]["model"]["physics"]["enabled"] = False
        ckpt["model"] = {k: v for k, v in ckpt["model"].items() if ".physics." not in k}
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "metrics.csv").write_text((run_dir / "metrics.csv").read_text())
    torch.save(ckpt, copy / LAST)
    with pytest.raises(SystemExit, match="without physics"):
        diagnose(cfg, copy)
