"""Shared fixtures: a tiny config and a fast synthetic raw source in the real source layout.

The synthetic source is random but plausible (positive concentrations, a smooth wind field,
descending latitude, ERA5/CAMS names and units attrs) so pipeline tests run in seconds; the
physically simulated sample is exercised separately by the sample tests and `make demo`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from pipeline.config import PipelineConfig, load_pipeline_config

REPO = Path(__file__).resolve().parents[1]


def tiny_raw_config(tmp_path: Path) -> dict:
    """The demo config shrunk to an 8x16 grid, 4x8 patches in 2x2 regions, 3-hourly for 6 days."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data = raw["data"]
    data["raw"] = str(tmp_path / "raw.nc")
    data["store"] = str(tmp_path / "features.zarr")
    data["shards"] = str(tmp_path / "shards")
    data["domain"] = {"lat_south": 30.0, "lon_west": 100.0, "resolution": 1.0, "n_lat": 8, "n_lon": 16}
    data["sample"] = {"period": {"start": "2018-01-01T00:00", "end": "2018-01-06T21:00"}, "step_hours": 3, "seed": 1}
    data["leads_h"] = [3, 6, 12]
    data["regions"] = [2, 2]
    data["splits"] = {
        "train": {"start": "2018-01-01T00:00", "end": "2018-01-03T21:00"},
        "val": {"start": "2018-01-04T00:00", "end": "2018-01-04T21:00"},
        "test": {"start": "2018-01-05T00:00", "end": "2018-01-06T21:00"},
    }
    raw["build"] = {"time_chunk": 8, "zarr_format": 3, "n_workers": 1, "threads_per_worker": 2}
    raw["shard"] = {"max_count": 8}
    return raw


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_synthetic_source(cfg: PipelineConfig, seed: int = 0) -> xr.Dataset:
    """Write a random raw source matching `cfg` (descending latitude) to cfg.data.raw and return it."""
    data = cfg.data
    rng = np.random.default_rng(seed)
    times = pd.date_range(data.sample.period.start, data.sample.period.end, freq=f"{data.sample.step_hours}h")
    lat = np.array(data.domain.latitudes())[::-1]  # descending, like ERA5
    lon = np.array(data.domain.longitudes())
    nt, ny, nx = len(times), len(lat), len(lon)
    yy, xx = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, size=(nt, 1, 1))
    variables = {}
    for spec in data.variables:
        if spec.kind == "coordinate":
            continue
        if spec.kind == "static":
            if spec.name == "elevation":
                values = 3000.0 * np.exp(-((yy - 0.7) ** 2 + (xx - 0.3) ** 2) / 0.05)
            else:
                values = rng.lognormal(4, 1, size=(ny, nx))
            variables[spec.source] = (("latitude", "longitude"), values.astype(np.float32), {"units": spec.units})
            continue
        if spec.name in data.wind:
            base = 6.0 * np.cos(phase + 3 * xx) if spec.name == data.wind[0] else 4.0 * np.sin(phase + 2 * yy)
            values = base + rng.normal(0, 1, size=(nt, ny, nx))
        elif spec.name == "temp":
            values = 280 + 10 * yy + rng.normal(0, 2, size=(nt, ny, nx))
        elif spec.name == "psfc":
            values = 95000 + 1000 * xx + rng.normal(0, 100, size=(nt, ny, nx))
        elif spec.name == "rh":
            values = np.clip(60 + rng.normal(0, 15, size=(nt, ny, nx)), 1, 100)
        else:
            values = rng.lognormal(3, 0.5, size=(nt, ny, nx))
        variables[spec.source] = (("time", "latitude", "longitude"), values.astype(np.float32), {"units": spec.units})
    if data.static.loss_mask:
        variables[data.static.loss_mask] = (("latitude", "longitude"), (xx < 0.9).astype(np.float32), {"units": "1"})
    ds = xr.Dataset(
        variables,
        coords={
            "time": ("time", times),
            "latitude": ("latitude", lat, {"units": "degrees_north"}),
            "longitude": ("longitude", lon, {"units": "degrees_east"}),
        },
    )
    Path(data.raw).parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(data.raw, engine="h5netcdf")
    return ds


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


@pytest.fixture
def tiny_experiment(tiny_store: PipelineConfig, tiny_shards: Path, tmp_path: Path) -> dict:
    """Raw experiment dict on the session's tiny shards: a very small model and a few-step `train`
    section writing into tmp_path. Edit it, then `write_config` + `train.config.load_experiment_config`."""
    raw = tiny_store.model_dump(mode="json")
    raw["model"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "chunk_size": 16}
    raw["train"] = {"run_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "eval_batch_size": 4,
                    "warmup_steps": 1, "val_every": 2, "checkpoint_every": 2, "log_every": 1, "lr": 1e-3}
    return raw


@pytest.fixture
def torch_single_thread():
    """Run a test with one torch thread: on tiny tensors on a busy 2-core CI, intra-op threads cost far
    more than they gain (a 32-token forward takes 0.8 s with 2 oversubscribed threads, 0.07 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
