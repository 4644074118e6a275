"""Experiment config: every section validated, overrides, clear errors naming the key."""

from __future__ import annotations

import re
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


def test_overrides_are_typed_as_yaml_1_2() -> None:
    cfg = load_experiment_config(REPO / "configs" / "demo.yaml",
                                 ["train.lr=5e-5", "model.physics.enabled=false", "train.run_dir=/tmp/x",
                                  "train.max_steps=1e3", "build.slurm.walltime=02:00:00"])
    assert cfg.train.lr == 5e-5 and cfg.model.physics.enabled is False and str(cfg.train.run_dir) == "/tmp/x"
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)  # YAML 1.1 read "1e3" as a string
    assert cfg.build.slurm.walltime == "02:00:00"  # YAML 1.1 read it as 7200 (base 60)


@pytest.mark.parametrize(("override", "message"), [
    ("train.learning_rate=1", "train.learning_rate (from --set train.learning_rate=1): unknown key"),
    ("train.batch_size=zero", "train.batch_size (from --set train.batch_size=zero): Input should be a valid integer"),
    ("model.physics.directon=uphill", "model.physics.directon (from --set model.physics.directon=uphill): unknown "
                                      "key; did you mean model.physics.direction?"),
    ("train.max_stpes=10", "did you mean train.max_steps?"),
    ("evaluate.split=train", "evaluate.split (from --set evaluate.split=train)"),
    ("train.freeze_backbone=true", "freeze_backbone needs init_from"),
    ("trian.lr=1", "unknown section 'trian'; did you mean 'train'?"),
    ("train.lr=[1", "the value is not valid YAML"),
])
def test_bad_keys_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment_config(REPO / "configs" / "demo.yaml", [override])


def test_bad_ablation_variant_fails_at_load(tmp_path: Path) -> None:
    text = (REPO / "configs" / "demo.yaml").read_text()
    text += "  variants:\n    - {name: typo, overrides: [model.physics.form=multiplicatve]}\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="(?s)ablate variant 'typo'.*model.physics.form"):
        load_experiment_config(path)


def test_a_bad_key_in_the_file_is_reported_as_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text((REPO / "configs" / "demo.yaml").read_text().replace("  batch_size:", "  batchsize:", 1))
    with pytest.raises(ConfigError, match=rf"train.batchsize \(in {path}\): unknown key; did you mean "
                                          r"train.batch_size\?"):
        load_experiment_config(path, ["train.lr=1e-4"])


def test_init_variables_names_the_checkpoint_variables() -> None:
    base = ["train.init_from=climax.ckpt"]
    cfg = load_experiment_config(REPO / "configs" / "demo.yaml",
                                 base + ["train.init_variables=[10m_u_component_of_wind, orography, geopotential_500, pm25]"])
    assert cfg.train.init_variables == ["10m_u_component_of_wind", "orography", "geopotential_500", "pm25"]
    for keyword in ("positional", "climax"):
        cfg = load_experiment_config(REPO / "configs" / "demo.yaml", base + [f"train.init_variables={keyword}"])
        assert cfg.train.init_variables == keyword


@pytest.mark.parametrize(("override", "message"), [
    ("train.init_variables=[10m_u_componnet_of_wind, temp]",
     "'10m_u_componnet_of_wind' (did you mean '10m_u_component_of_wind'?) is neither a model variable"),
    ("train.init_variables=[u, u]", "init_variables must list each checkpoint variable once"),
    ("train.init_variables=by_position", "Input should be 'positional' or 'climax'"),
])
def test_bad_init_variables_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment_config(REPO / "configs" / "demo.yaml", ["train.init_from=climax.ckpt", override])
    with pytest.raises(ConfigError, match="init_variables names the variables of init_from's checkpoint"):
        load_experiment_config(REPO / "configs" / "demo.yaml", ["train.init_variables=positional"])
