"""`python -m pipeline sample`: the embedded sample, written as the raw downloads a user would have.

The simulation (`pipeline.sample.simulate`, hourly on the target grid, on real terrain) is written in
the conventions of `pipeline.sample.conventions`, so `make demo` takes the path real users take:
- ERA5-like monthly files, hourly, on points at whole degrees (latitude descending), `valid_time`,
  `expver` (the last month ERA5T, 0005), ECMWF unit strings, dewpoint `d2m` instead of RH;
- an ERA5-like invariants file: surface geopotential `z` and land-sea mask `lsm`;
- CAMS-like monthly files, 3-hourly, on a coarser 1.5-degree grid, PM in kg m**-3 and the gases as
  mass mixing ratios (kg kg**-1) on model level 60;
- a 0.25-degree population density raster with a fill value over sea.
Fields are interpolated from the simulation's cell centres to those points with the build's own
bilinear weights. `sample.json`, written last, records the fingerprint of what shaped the files, so an
up-to-date sample is not regenerated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DomainConfig, PipelineConfig, SampleConfig, load_pipeline_config
from pipeline.sample import conventions, simulate
from pipeline.sample.simulate import Grid, Simulation, make_surface
from pipeline.sources import dem, derived
from pipeline.sources.dem import regrid_elevation
from pipeline.sources.derived import G0, dewpoint_from_vapour_pressure, saturation_vapour_pressure
from pipeline.sources.grid import axis_weights
from pipeline.sources.units import air_density
from topoflow.config import add_override_argument
from topoflow.errors import ConfigError
from topoflow.files import atomic_write_json, sha256_json
from topoflow.progress import progress_bar

log = logging.getLogger("pipeline")
SPINUP_DAYS = 10  # simulated before the first time step so the first fields are not clean air
ERA5_STEP_DEG, CAMS_STEP_DEG, POPULATION_SPLIT = 1.0, 1.5, 4  # points every 1 and 1.5 degree; 0.25-degree raster
CAMS_EVERY_H = 3
MANIFEST = "sample.json"


class SampleError(ConfigError):
    """The sample cannot be written as asked; the message says why and what to do."""


def _sample_config(cfg: PipelineConfig) -> SampleConfig:
    if cfg.data.sample is None:
        raise SampleError("the config has no data.sample section: add `sample: {dir: data/demo/raw}` under data to "
                          "write the embedded sample, or point data.sources at your own files")
    return cfg.data.sample


def fingerprint(cfg: PipelineConfig) -> str:
    """Hash of everything that shapes the sample's bytes: the generator's code, domain, period, seed."""
    code = hashlib.sha256()
    for module in (simulate, conventions, dem, derived, sys.modules[__name__]):
        code.update(Path(module.__file__).read_bytes())
    d = cfg.data
    return sha256_json({"code": code.hexdigest(), "domain": d.domain.model_dump(mode="json"),
                        "period": d.period.model_dump(mode="json"), "seed": _sample_config(cfg).seed})[:16]


def point_axes(domain: DomainConfig, step: float) -> tuple[np.ndarray, np.ndarray]:
    """(latitudes descending, longitudes) on multiples of `step` degrees, one point beyond the domain."""
    south, north = domain.lat_south, domain.lat_south + domain.n_lat * domain.resolution
    west, east = domain.lon_west, domain.lon_west + domain.n_lon * domain.resolution
    lat = np.arange(np.floor(south / step) - 1, np.ceil(north / step) + 2) * step
    lon = np.arange(np.floor(west / step) - 1, np.ceil(east / step) + 2) * step
    return lat[::-1], lon


class Points:
    """Bilinear interpolation from the simulation's cell centres to a point grid (edge values beyond them)."""

    def __init__(self, domain: DomainConfig, lat: np.ndarray, lon: np.ndarray) -> None:
        clat, clon = domain.latitudes(), domain.longitudes()
        self.lat, self.lon = lat, lon
        self.w_lat = axis_weights(clat, np.clip(lat, clat[0], clat[-1]), "bilinear", True)
        self.w_lon = axis_weights(clon, np.clip(lon, clon[0], clon[-1]), "bilinear", False)

    def __call__(self, field: np.ndarray) -> np.ndarray:
        return (self.w_lat @ field.astype(np.float64) @ self.w_lon.T).astype(np.float32)


def era5_fields(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ERA5 short names and units from the simulation's fields: dewpoint from RH (the build derives RH back)."""
    vapour = f["rh"] / 100.0 * saturation_vapour_pressure(f["temp"] - 273.15)
    return {"u10": f["u"], "v10": f["v"], "t2m": f["temp"], "d2m": dewpoint_from_vapour_pressure(vapour) + 273.15,
            "sp": f["psfc"]}


def cams_fields(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CAMS short names and units: PM as kg m**-3, gases as mass mixing ratios kg kg**-1 (c / rho)."""
    rho = air_density(f["psfc"], f["temp"])
    kg = {"pm2p5": f["pm25"] * 1e-9, "pm10": f["pm10"] * 1e-9, "so2": f["so2"] * 1e-9, "no2": f["no2"] * 1e-9,
          "co": f["co"] * 1e-6, "go3": f["o3"] * 1e-9}
    return {k: v if k.startswith("pm") else v / rho for k, v in kg.items()}


class MonthlyFiles:
    """Hourly ERA5 and 3-hourly CAMS values buffered for one month at a time, then written."""

    def __init__(self, root: Path, domain: DomainConfig, last_month: pd.Period) -> None:
        self.root, self.last_month = root, last_month
        self.era5, self.cams = Points(domain, *point_axes(domain, ERA5_STEP_DEG)), \
            Points(domain, *point_axes(domain, CAMS_STEP_DEG))
        self.month: pd.Period | None = None
        self.buffers: dict[str, tuple[list, dict[str, list]]] = {}
        self.written: list[Path] = []

    def add(self, time: pd.Timestamp, fields: dict[str, np.ndarray]) -> None:
        if self.month is not None and time.to_period("M") != self.month:
            self.flush()
        self.month = time.to_period("M")
        era5_t, era5_v = self.buffers.setdefault("era5", ([], {}))
        era5_t.append(time)
        for k, v in era5_fields(fields).items():
            era5_v.setdefault(k, []).append(self.era5(v))
        if time.hour % CAMS_EVERY_H == 0:
            cams_t, cams_v = self.buffers.setdefault("cams", ([], {}))
            cams_t.append(time)
            for k, v in cams_fields(fields).items():
                cams_v.setdefault(k, []).append(self.cams(v))

    def flush(self) -> None:
        """Write the buffered month (the last month as ERA5T, expver 0005, as a recent download would be)."""
        stamp = f"{self.month:%Y-%m}"
        for name, (times, values) in self.buffers.items():
            stacked = {k: np.stack(v) for k, v in values.items()}
            points = self.era5 if name == "era5" else self.cams
            if name == "era5":
                expver = "0005" if self.month == self.last_month else "0001"
                path = conventions.write_era5(self.root / "era5" / f"era5_single_levels_{stamp}.nc",
                                              pd.DatetimeIndex(times), points.lat, points.lon, stacked, expver)
            else:
                path = conventions.write_cams(self.root / "cams" / f"cams_eac4_{stamp}.nc", pd.DatetimeIndex(times),
                                              points.lat, points.lon, stacked)
            self.written.append(path)
        self.buffers = {}


def write_statics(root: Path, domain: DomainConfig, time: pd.Timestamp, elevation: np.ndarray, land: np.ndarray,
                  population: np.ndarray) -> list[Path]:
    """ERA5-like invariants (z = elevation * g0, lsm) on the ERA5 points, and a 0.25-degree population raster
    (each target cell split into 4 x 4, so a conservative regrid gives the cell back) with fill over sea."""
    points = Points(domain, *point_axes(domain, ERA5_STEP_DEG))
    era5 = conventions.write_era5_invariant(root / "era5" / "era5_invariant.nc", time, points.lat, points.lon,
                                            points(elevation) * G0, np.clip(points(land), 0.0, 1.0))
    split = POPULATION_SPLIT
    fine = np.repeat(np.repeat(np.where(land > 0, population, np.nan), split, 0), split, 1)[::-1]
    res = domain.resolution / split
    lat = domain.lat_south + (np.arange(domain.n_lat * split) + 0.5) * res
    lon = domain.lon_west + (np.arange(domain.n_lon * split) + 0.5) * res
    lon = (lon + 180.0) % 360.0 - 180.0  # rasters of this kind count longitudes from -180
    order = np.argsort(lon)
    density = conventions.write_density(root / "population" / "population_density.nc", lat[::-1], lon[order],
                                        fine[:, order])
    return [era5, density]


def _up_to_date(root: Path, fp: str, overwrite: bool) -> bool:
    """True when root holds this very sample; a folder of someone else's files is never replaced."""
    manifest = root / MANIFEST
    if overwrite or not root.exists():
        return False
    if not manifest.is_file():
        if any(root.iterdir()):
            raise SampleError(f"{root} holds files not written by `pipeline sample`; refusing to replace them: move "
                              "them away, set data.sample.dir elsewhere, or pass --overwrite")
        return False
    old = json.loads(manifest.read_text()).get("fingerprint")
    if old == fp:
        print(f"sample {root} is up to date (fingerprint {fp}); nothing to do (--overwrite regenerates it)")
        return True
    print(f"sample {root} was made from another config or generator (fingerprint {old} -> {fp}); regenerating")
    return False


def write_sample(cfg: PipelineConfig, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Simulate and write the sample's files under data.sample.dir; skip when they are up to date."""
    d, sample = cfg.data, _sample_config(cfg)
    root, fp = Path(sample.dir), fingerprint(cfg)
    if _up_to_date(root, fp, overwrite):
        return root
    shutil.rmtree(root, ignore_errors=True)
    hourly = pd.date_range(d.period.start, d.period.end, freq="1h")
    grid, ground = Grid.from_domain(d.domain), regrid_elevation(d.domain)
    surface = make_surface(grid, ground.elevation, ground.land_fraction, sample.seed)
    origin = hourly[0] - pd.Timedelta(days=SPINUP_DAYS)
    sim = Simulation(grid, surface, origin, len(hourly) + SPINUP_DAYS * 24, sample.seed)
    files = MonthlyFiles(root, d.domain, hourly[-1].to_period("M"))
    with progress_bar(len(hourly), unit="hour", desc="sample", log=log, enabled=progress) as bar:
        for time, fields in sim.run(hourly):
            files.add(time, fields)
            bar.update(1)
    files.flush()
    written = files.written + write_statics(root, d.domain, hourly[0], ground.elevation, ground.land_fraction,
                                            surface.population)
    atomic_write_json(root / MANIFEST, {"fingerprint": fp, "files": [str(p.relative_to(root)) for p in written]})
    print(f"wrote sample {root}: {len(written)} files, {len(hourly)} hours on {d.domain.n_lat}x{d.domain.n_lon} ({fp})")
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (section data is used)")
    add_override_argument(parser, "data.sample.seed=1")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the files are up to date")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = load_pipeline_config(args.config, args.overrides)
    write_sample(cfg, overwrite=args.overwrite, progress=args.progress)
    return 0
