"""Test helpers: a tiny experiment config and a fast synthetic raw source in the real source layout.

The synthetic source is random but plausible (positive concentrations, a smooth wind field,
latitude descending as ERA5 writes it, the config's source names and units attrs), so pipeline
tests run in seconds; the physically simulated sample is exercised by tests/pipeline/test_sample.py
and `make demo`.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.config import DomainConfig, PipelineConfig
from topoflow.config import read_yaml, write_yaml

REPO = Path(__file__).resolve().parents[1]


PREPARED = {  # model name -> (name in the prepared file, units written there)
    "u": ("u10", "m s**-1"), "v": ("v10", "m s**-1"), "temp": ("t2m", "K"), "rh": ("r2", "%"), "psfc": ("sp", "Pa"),
    "pm10": ("pm10", "ug m-3"), "so2": ("so2", "ug m-3"), "no2": ("no2", "ug m-3"), "co": ("co", "mg m-3"),
    "o3": ("go3", "ug m-3"), "pm25": ("pm2p5", "ug m-3"),
}
PREPARED_STATIC = {"elevation": ("orography", "m"), "population": ("population", "km-2"), "land_sea": ("lsm", "1")}


def tiny_raw_config(tmp_path: Path) -> dict:
    """The demo experiment shrunk to an 8x16 grid, 4x8 patches in 2x2 regions, 3-hourly for 6 days, reading
    one prepared file already on the target grid (latitude descending, ECMWF unit spellings): the kind of
    source a user who regridded their data beforehand has. ERA5/CAMS/CAQRA files: tests/pipeline/test_sources.py."""
    raw = read_yaml(REPO / "configs" / "demo.yaml")
    source = str(tmp_path / "raw.nc")
    raw["data"] = {
        "store": str(tmp_path / "features.zarr"), "shards": str(tmp_path / "shards"),
        "domain": {"lat_south": 30.0, "lon_west": 100.0, "resolution": 1.0, "n_lat": 8, "n_lon": 16},
        "step_hours": 3,
        "sources": [
            {"name": "prepared", "files": source, "regrid": "none",
             "variables": {name: var for name, (var, _) in PREPARED.items()}},
            {"name": "prepared_static", "files": source, "regrid": "none",
             "variables": {name: var for name, (var, _) in PREPARED_STATIC.items()}},
        ],
        "static": {"elevation": "elevation", "loss_mask": {"variable": "land_sea", "threshold": 0.5}},
        "variables": raw["data"]["variables"],
        "leads_h": [3, 6, 12],
        "patch_size": 2,
        "regions": [2, 2],
        "splits": {
            "train": {"start": "2018-01-01T00:00", "end": "2018-01-03T21:00"},
            "val": {"start": "2018-01-04T00:00", "end": "2018-01-04T21:00"},
            "test": {"start": "2018-01-05T00:00", "end": "2018-01-06T21:00"},
        },
    }
    raw["build"] = {"time_chunk": 8, "zarr_format": 3, "n_workers": 1}
    raw["shard"] = {"max_count": 8}
    return raw


def write_config(raw: dict, path: Path) -> Path:
    write_yaml(raw, path)
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
    """Write the tiny config's prepared file (random, plausible, latitude descending) and return it."""
    data = cfg.data
    rng = np.random.default_rng(seed)
    times = data.times()
    lat, lon = data.domain.latitudes()[::-1], data.domain.longitudes()  # latitude descending, like ERA5
    shape = (len(times), len(lat), len(lon))
    yy, xx = np.meshgrid(np.linspace(0, 1, len(lat)), np.linspace(0, 1, len(lon)), indexing="ij")
    variables = {}
    for name, (var, units) in PREPARED.items():
        values = _dynamic_values(name, data.wind, rng, shape, yy, xx)
        variables[var] = (("time", "latitude", "longitude"), values.astype(np.float32),
                          {"units": units, "standard_name": f"{name}_standard", "long_name": f"{name} (synthetic)"})
    statics = {"elevation": 3000.0 * np.exp(-((yy - 0.7) ** 2 + (xx - 0.3) ** 2) / 0.05),
               "population": rng.lognormal(4, 1, size=yy.shape), "land_sea": (xx < 0.9).astype(np.float64)}
    for name, (var, units) in PREPARED_STATIC.items():
        variables[var] = (("latitude", "longitude"), statics[name].astype(np.float32), {"units": units})
    ds = xr.Dataset(variables, coords={"time": ("time", times),
                                       "latitude": ("latitude", lat, {"units": "degrees_north"}),
                                       "longitude": ("longitude", lon, {"units": "degrees_east"})})
    path = Path(cfg.data.sources[0].files)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="h5netcdf")
    return ds


def source_path(cfg: PipelineConfig) -> Path:
    """The tiny config's prepared file (both its sources read it)."""
    return Path(cfg.data.sources[0].files)


def with_source_path(cfg: PipelineConfig, path: Path) -> PipelineConfig:
    """A copy of `cfg` whose sources read `path` instead."""
    sources = [s.model_copy(update={"files": str(path)}) for s in cfg.data.sources]
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources})})


def demo_config(tmp_path: Path, domain: DomainConfig, days: int, sample: dict | None = {}) -> Path:  # noqa: B006
    """configs/demo.yaml (the multi-source recipe) on `domain` for `days` days from 2018-01-01, 6-hourly,
    with every path under tmp_path; `sample` updates data.sample (None: no sample section)."""
    raw = read_yaml(REPO / "configs" / "demo.yaml")
    data = raw["data"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "raw"
    for source in data["sources"]:
        source["files"] = source["files"].replace("data/demo/raw", str(root))
    data.update(store=str(tmp_path / "features.zarr"), shards=str(tmp_path / "shards"),
                domain=domain.model_dump(mode="json"), leads_h=[6, 12], regions=[2, 2] if domain.n_lat < 16 else [4, 8])
    data["sample"] = None if sample is None else {**data["sample"], "dir": str(root), **sample}
    end = f"2018-01-{days:02d}T18:00"
    data["splits"] = {"train": {"start": "2018-01-01T00:00", "end": end}}
    raw["build"] = {"time_chunk": 8, "processes": False, "n_workers": 1}
    return write_config(raw, tmp_path / "demo.yaml")


def rehash_shard(shards: Path, name: str) -> None:
    """Make the manifest agree with a tampered shard, as an attacker who rewrites both would."""
    from topoflow.files import sha256_file

    manifest = json.loads((shards / "manifest.json").read_text())
    entry = next(s for r in manifest["splits"].values() for s in r["shards"] if s["name"] == name)
    entry["bytes"], entry["sha256"] = (shards / name).stat().st_size, sha256_file(shards / name)
    (shards / "manifest.json").write_text(json.dumps(manifest))


def plant_pickled_input(source: Path, shards: Path, shard: str, key: str) -> None:
    """Copy of shard `source/shard` into `shards` whose `key`.input.npy is an object array (loading it would
    unpickle), with the manifest rehashed to match."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(source / shard) as src, tarfile.open(shards / shard, "w") as dst:
        for info in src:
            data = src.extractfile(info).read()
            if info.name == f"{key}.input.npy":
                data, info.size = buffer.getvalue(), len(buffer.getvalue())
            dst.addfile(info, io.BytesIO(data))
    rehash_shard(shards, shard)


def read_tar_frames(path: Path) -> dict[int, dict[str, bytes]]:
    """Split position -> member -> bytes of a shard, straight from the tar (independent of the codec)."""
    frames: dict[int, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, member = info.name.split(".", 1)
            frames.setdefault(int(key.rsplit("_", 1)[1]), {})[member] = tar.extractfile(info).read()
    return frames


class StoreSamples:
    """What every sample of a split should hold, computed from the store by time arithmetic alone (not by
    the shard code): the input row, and the targets at t + lead inside the split, NaN past its end."""

    def __init__(self, store: Path, period: object, leads_h: list[int], targets: list[str]) -> None:
        ds = xr.open_zarr(store, consolidated=False)
        times = ds.time.values
        self.index = np.nonzero((times >= np.datetime64(period.start)) & (times <= np.datetime64(period.end)))[0]
        self.times, self.valid = times[self.index], ds.valid.values[self.index]
        self.fields = ds.fields.values[self.index]
        self.tvars = [list(ds["var"].values).index(t) for t in targets]
        self.leads = [np.timedelta64(h, "h") for h in leads_h]
        self._position = {t: p for p, t in enumerate(self.times)}
        self.per_time = {name: ds[name].values[self.index]
                         for name in ("scan_order", "scan_order_global", "wind_speed")}

    def target_positions(self, p: int) -> list[int | None]:
        return [self._position.get(self.times[p] + lead) for lead in self.leads]

    def is_sample(self, p: int) -> bool:
        """Input valid and every target inside the split valid."""
        return bool(self.valid[p]) and all(self.valid[q] for q in self.target_positions(p) if q is not None)

    def targets(self, p: int) -> np.ndarray:
        """(n_leads, P, H, W) physical targets, NaN where t + lead is past the split."""
        out = np.full((len(self.leads), len(self.tvars), *self.fields.shape[2:]), np.nan, dtype=np.float32)
        for lead, q in enumerate(self.target_positions(p)):
            if q is not None:
                out[lead] = self.fields[q][self.tvars]
        return out
