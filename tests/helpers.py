"""Test helpers: a tiny experiment config and a fast synthetic raw source in the real source layout.

The synthetic source is random but plausible (positive concentrations, a smooth wind field,
latitude descending as ERA5 writes it, the config's source names and units attrs), so pipeline
tests run in seconds; the physically simulated sample is exercised by tests/pipeline/test_sample.py
and `make demo`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
import yaml

from pipeline.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_raw_config(tmp_path: Path) -> dict:
    """The demo config shrunk to an 8x16 grid, 4x8 patches in 2x2 regions, 3-hourly for 6 days."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data = raw["data"]
    data["raw"] = str(tmp_path / "raw.nc")
    data["store"] = str(tmp_path / "features.zarr")
    data["shards"] = str(tmp_path / "shards")
    data["domain"] = {"lat_south": 30.0, "lon_west": 100.0, "resolution": 1.0, "n_lat": 8, "n_lon": 16}
    data["step_hours"] = 3
    data["sample"] = {"seed": 1}
    data["leads_h"] = [3, 6, 12]
    data["regions"] = [2, 2]
    data["splits"] = {
        "train": {"start": "2018-01-01T00:00", "end": "2018-01-03T21:00"},
        "val": {"start": "2018-01-04T00:00", "end": "2018-01-04T21:00"},
        "test": {"start": "2018-01-05T00:00", "end": "2018-01-06T21:00"},
    }
    raw["build"] = {"time_chunk": 8, "zarr_format": 3, "n_workers": 1}
    raw["shard"] = {"max_count": 8}
    return raw


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _dynamic_values(name: str, wind: tuple[str, str], rng: np.random.Generator, shape: tuple[int, int, int],
                    yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Plausible random values of one dynamic variable (smooth winds, positive concentrations)."""
    phase = rng.uniform(0, 2 * np.pi, size=(shape[0], 1, 1))
    if name == wind[0]:
        return 6.0 * np.cos(phase + 3 * xx) + rng.normal(0, 1, size=shape)
    if name == wind[1]:
        return 4.0 * np.sin(phase + 2 * yy) + rng.normal(0, 1, size=shape)
    if name == "temp":
        return 280 + 10 * yy + rng.normal(0, 2, size=shape)
    if name == "psfc":
        return 95000 + 1000 * xx + rng.normal(0, 100, size=shape)
    if name == "rh":
        return np.clip(60 + rng.normal(0, 15, size=shape), 1, 100)
    return rng.lognormal(3, 0.5, size=shape)


def write_synthetic_source(cfg: PipelineConfig, seed: int = 0) -> xr.Dataset:
    """Write a random raw source matching `cfg` (descending latitude) to cfg.data.raw and return it."""
    data = cfg.data
    rng = np.random.default_rng(seed)
    times = data.times()
    lat, lon = data.domain.latitudes()[::-1], data.domain.longitudes()  # latitude descending, like ERA5
    shape = (len(times), len(lat), len(lon))
    yy, xx = np.meshgrid(np.linspace(0, 1, len(lat)), np.linspace(0, 1, len(lon)), indexing="ij")
    variables = {}
    for spec in data.variables:
        if spec.kind == "static":
            values = 3000.0 * np.exp(-((yy - 0.7) ** 2 + (xx - 0.3) ** 2) / 0.05) if spec.name == "elevation" \
                else rng.lognormal(4, 1, size=yy.shape)
            variables[spec.source] = (("latitude", "longitude"), values.astype(np.float32), {"units": spec.units})
        elif spec.kind == "dynamic":
            values = _dynamic_values(spec.name, data.wind, rng, shape, yy, xx)
            variables[spec.source] = (("time", "latitude", "longitude"), values.astype(np.float32),
                                      {"units": spec.units, "standard_name": f"{spec.name}_standard",
                                       "long_name": f"{spec.name} (synthetic)"})
    if data.static.loss_mask:
        variables[data.static.loss_mask] = (("latitude", "longitude"), (xx < 0.9).astype(np.float32), {"units": "1"})
    ds = xr.Dataset(variables, coords={"time": ("time", times),
                                       "latitude": ("latitude", lat, {"units": "degrees_north"}),
                                       "longitude": ("longitude", lon, {"units": "degrees_east"})})
    Path(data.raw).parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(data.raw, engine="h5netcdf")
    return ds
