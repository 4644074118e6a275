"""Shared fixtures: a tiny config, its synthetic source, and a store and shard set built once per session.

The helpers behind them live in tests/helpers.py (import them from there, not from this file).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import xarray as xr

from pipeline.config import PipelineConfig, load_pipeline_config
from tests.helpers import tiny_raw_config, write_config, write_synthetic_source


@pytest.fixture(autouse=True, scope="session")
def _fingerprint_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Source fingerprints are cached in a session folder, never in the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPOFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("topoflow-cache")))
    yield
    mp.undo()


@pytest.fixture
def tiny_config_path(tmp_path: Path) -> Path:
    """Path of a tiny experiment YAML whose data paths point into tmp_path."""
    return write_config(tiny_raw_config(tmp_path), tmp_path / "tiny.yaml")


@pytest.fixture
def tiny_config(tiny_config_path: Path) -> PipelineConfig:
    return load_pipeline_config(tiny_config_path)


@pytest.fixture
def tiny_source(tiny_config: PipelineConfig) -> xr.Dataset:
    """The tiny synthetic raw source, written to tiny_config.data.raw."""
    return write_synthetic_source(tiny_config)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    """A real `build_features` run on the tiny synthetic source, built once per session.

    Returns its config (cfg.data.store is the store, cfg.data.shards where `tiny_shards` writes).
    shard.max_count is 4, so the train split (24 steps) has 6 shards: enough for 2 ranks x 2 workers.
    Read-only: copy it before modifying.
    """
    from pipeline.build import build_features

    root = tmp_path_factory.mktemp("tiny_store")
    raw = tiny_raw_config(root)
    raw["shard"] = {"max_count": 4}
    cfg = load_pipeline_config(write_config(raw, root / "tiny.yaml"))
    write_synthetic_source(cfg)
    build_features(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def tiny_shards(tiny_store: PipelineConfig) -> Path:
    """The shard set of `tiny_store` (directory holding manifest.json); read-only, copy before modifying."""
    from pipeline.shard import write_shards

    return write_shards(tiny_store, progress=False).parent


def _tiny_experiment_raw(tiny_store: PipelineConfig, run_dir: Path) -> dict:
    raw = tiny_store.model_dump(mode="json")
    raw["model"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "chunk_size": 16}
    raw["train"] = {"run_dir": str(run_dir), "max_steps": 4, "batch_size": 2, "eval_batch_size": 4,
                    "warmup_steps": 1, "val_every": 2, "checkpoint_every": 2, "log_every": 1, "lr": 1e-3}
    return raw


@pytest.fixture
def tiny_experiment(tiny_store: PipelineConfig, tiny_shards: Path, tmp_path: Path) -> dict:
    """Raw experiment dict on the session's tiny shards: a very small model and a few-step `train`
    section writing into tmp_path. Edit it, then `write_config` + `train.config.load_experiment_config`."""
    return _tiny_experiment_raw(tiny_store, tmp_path / "run")


@pytest.fixture(scope="session")
def evaluated_run(tiny_store: PipelineConfig, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config of a `tiny_experiment` run fitted and evaluated once per session (its report in
    <run_dir>/report): for tests that read evaluate's outputs. Read-only; evaluate again with --output."""
    from train.__main__ import main

    root = tmp_path_factory.mktemp("evaluated_run")
    config = write_config(_tiny_experiment_raw(tiny_store, root / "run"), root / "eval.yaml")
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    assert main(["evaluate", "--config", str(config), "--no-progress"]) == 0
    return config


@pytest.fixture
def torch_single_thread():
    """Run a test with one torch thread: on tiny tensors on a busy 2-core CI, intra-op threads cost far
    more than they gain (a 32-token forward takes 0.8 s with 2 oversubscribed threads, 0.07 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
