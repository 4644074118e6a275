"""Experiment config: every section validated, overrides, clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from topoflow.errors import ConfigError
from train.config import ExperimentConfig, load_experiment_config

from tests.helpers import REPO


@pytest.mark.parametrize("name", ["demo.yaml", "topoflow_china.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_experiment_config(REPO / "configs" / name)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.ablate.baseline_val_loss == 0.3557 and cfg.ablate.target_val_loss == 0.32
    assert [v.name for v in cfg.ablate.variants] == [
        "no_physics", "scan_only", "scan_barrier_uphill", "barrier_key_higher", "multiplicative"]


def test_overrides_are_typed() -> None:
    cfg = load_experiment_config(REPO / "configs" / "demo.yaml",
                                 ["train.lr=5e-5", "model.physics.enabled=false", "train.run_dir=/tmp/x"])
    assert cfg.train.lr == 5e-5 and cfg.model.physics.enabled is False and str(cfg.train.run_dir) == "/tmp/x"


@pytest.mark.parametrize(("override", "message"), [
    ("train.learning_rate=1", "train.learning_rate: Extra inputs are not permitted"),
    ("train.batch_size=zero", "train.batch_size"),
    ("model.physics.directon=uphill", "model.physics.directon"),
    ("evaluate.split=train", "evaluate.split"),
    ("train.freeze_backbone=true", "freeze_backbone needs init_from"),
    ("trian.lr=1", "unknown section 'trian'"),
])
def test_bad_keys_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_experiment_config(REPO / "configs" / "demo.yaml", [override])


def test_bad_ablation_variant_fails_at_load(tmp_path: Path) -> None:
    text = (REPO / "configs" / "demo.yaml").read_text()
    text += "  variants:\n    - {name: typo, overrides: [model.physics.form=multiplicatve]}\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="(?s)ablate variant 'typo'.*model.physics.form"):
        load_experiment_config(path)
