"""`python -m train ablate`: every variant x seed trains in its own run dir; table and verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import write_config
from train.__main__ import main
from train.ablate import verdict
from train.config import load_experiment_config

pytestmark = pytest.mark.slow


def test_ablation_table_and_verdict(tiny_experiment: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = dict(tiny_experiment)
    raw["train"] = {**raw["train"], "max_steps": 1, "val_batches": 1}
    raw["ablate"] = {"run_dir": str(tmp_path / "abl"), "seeds": [0, 1], "variants": [
        {"name": "no_physics", "overrides": ["model.scan=none", "model.physics.enabled=false"]},
        {"name": "multiplicative", "overrides": ["model.physics.form=multiplicative"]},
    ]}
    config = write_config(raw, tmp_path / "abl.yaml")
    assert main(["ablate", "--config", str(config), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert list(summary["val_loss"]) == ["no_physics", "multiplicative"]
    assert all(len(v) == 2 for v in summary["val_loss"].values())
    for seed in (0, 1):
        ckpt_cfg = (tmp_path / "abl" / "multiplicative" / f"seed{seed}" / "last.ckpt")
        assert ckpt_cfg.is_file()
    text = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| no_physics |" in text and "+-" in text and "Verdict:" in text
    assert "Verdict:" in capsys.readouterr().out
    # a rerun reuses the finished runs (resume at their last step) and gives the same table
    assert main(["ablate", "--config", str(config), "--no-progress"]) == 0
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["val_loss"] == summary["val_loss"]


def test_verdict_against_reference_criteria(tiny_experiment: dict, tmp_path: Path) -> None:
    cfg = load_experiment_config(write_config(tiny_experiment, tmp_path / "v.yaml"))
    line = verdict({"no_physics": [0.36, 0.35], "scan_only": [0.3557, 0.3557], "scan_barrier_uphill": [0.31, 0.30],
                    "barrier_key_higher": [0.4, 0.4], "multiplicative": [0.33, 0.33]}, cfg)
    assert "`scan_barrier_uphill` (val loss 0.3050) MEETS the reference target < 0.32" in line
    assert "below the reference baseline 0.3557" in line and "14.1% lower than `no_physics`'s (0.3550)" in line
    line = verdict({"no_physics": [0.5], "scan_only": [0.4]}, cfg)
    assert "does NOT meet" in line and "not below" in line
