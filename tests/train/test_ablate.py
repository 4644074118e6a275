"""`python -m train ablate`: every variant x seed trains in its own run dir; table and verdict."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.helpers import write_config
from train import ablate_skill
from train.__main__ import main
from train.ablate import verdict
from train.config import load_experiment_config
from train.evaluate import evaluate

pytestmark = pytest.mark.slow


def test_ablation_table_and_verdict(tiny_experiment: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    evaluated: list[Path] = []

    def counting_evaluate(cfg, **kwargs):  # noqa: ANN001, ANN003, ANN202 - a spy around the real evaluate
        evaluated.append(kwargs["output"])
        return evaluate(cfg, **kwargs)

    monkeypatch.setattr(ablate_skill, "evaluate", counting_evaluate)
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
    _assert_test_split_summary(summary, text)
    assert len(evaluated) == 4 and all((out / "errors.npz").is_file() for out in evaluated)
    # a rerun reuses the finished runs (resume at their last step) and their test reports, and gives the same tables
    assert main(["ablate", "--config", str(config), "--no-progress"]) == 0
    again = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert again["val_loss"] == summary["val_loss"] and again["test_verdicts"] == summary["test_verdicts"]
    assert len(evaluated) == 4  # nothing re-evaluated


def _assert_test_split_summary(summary: dict, text: str) -> None:
    """Finite mean/std of RMSE, MAE, bias, corr and SS vs persistence per pollutant and lead; one verdict per
    non-control variant with its p-value."""
    assert summary["control"] == "no_physics" and list(summary["test_skill"]) == ["no_physics", "multiplicative"]
    for by_pollutant in summary["test_skill"].values():
        rows = [row for by_lead in by_pollutant.values() for row in by_lead.values()]
        assert rows and all({"rmse", "mae", "bias", "ss_persistence"} <= set(row) for row in rows)
        assert all(math.isfinite(v) for row in rows for k in ("rmse", "mae", "bias", "ss_persistence")
                   for v in row[k])
    overall = summary["significance"]["multiplicative"]["overall"]
    assert 0.0 <= overall["p_value"] <= 1.0 and overall["times"] >= 3
    [line] = summary["test_verdicts"]
    assert re.search(r"`multiplicative` vs control `no_physics`: (not )?significant .*p = [0-9.e-]+", line)
    assert "## Test split, mean +- std over 2 seeds" in text and "| multiplicative | pm25 |" in text
    assert line in text and "Diebold-Mariano p" in text
    # terrain strata and the uphill attention share, per variant (no bias to measure without physics)
    assert [set(by_s) for by_s in summary["terrain_skill"].values()] == [{"mountain", "basin", "plain"}] * 2
    uphill = summary["uphill_attention_share"]
    assert math.isnan(uphill["no_physics"]["with_bias"][0]) and 0 <= uphill["multiplicative"]["with_bias"][0] <= 1
    assert "## Test split by terrain stratum" in text and "| multiplicative | plain | pm25 |" in text
    assert "## Attention crossing > 1,000 m uphill" in text


def test_verdict_against_reference_criteria(tiny_experiment: dict, tmp_path: Path) -> None:
    cfg = load_experiment_config(write_config(tiny_experiment, tmp_path / "v.yaml"))
    line = verdict({"no_physics": [0.36, 0.35], "scan_only": [0.3557, 0.3557], "scan_barrier_uphill": [0.31, 0.30],
                    "barrier_key_higher": [0.4, 0.4], "multiplicative": [0.33, 0.33]}, cfg)
    assert "`scan_barrier_uphill` (val loss 0.3050) MEETS the reference target < 0.32" in line
    assert "below the reference baseline 0.3557" in line and "14.1% lower than `no_physics`'s (0.3550)" in line
    line = verdict({"no_physics": [0.5], "scan_only": [0.4]}, cfg)
    assert "does NOT meet" in line and "not below" in line
