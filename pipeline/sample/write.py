"""`python -m pipeline sample`: write the embedded raw source (NetCDF) on real terrain.

The file has exactly the layout `pipeline build` reads for any real ERA5/CAMS-style source: dims
(time, latitude DESCENDING, longitude), the config's source names and units, static fields without
a time dim, CF attributes. Data are simulated by `pipeline.sample.simulate` on pvlib's terrain and
streamed to disk in time blocks, so a year of the 128x256 grid never sits in memory. The file is
written under a temporary name and renamed when complete; a fingerprint of the config parts that
shape the data is stored in its attrs, so an up-to-date file is not regenerated.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import h5netcdf
import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import PipelineConfig, SampleConfig, load_pipeline_config
from pipeline.sample import simulate, terrain
from pipeline.sample.simulate import Grid, Simulation, make_surface
from pipeline.sample.terrain import regrid_elevation
from topoflow.config import add_override_argument
from topoflow.errors import ConfigError
from topoflow.files import sha256_json

SPINUP_DAYS = 10  # simulated before the first time step so the first fields are not clean air
FINGERPRINT_ATTR = "sample_fingerprint"


class SampleError(ConfigError):
    """The sample cannot be written as asked; the message says why and what to do."""


# model variable -> canonical units of the simulation; declared units may be any in CONVERSIONS
CANONICAL_UNITS = {
    "u": "m s-1", "v": "m s-1", "temp": "K", "rh": "%", "psfc": "Pa", "pm25": "ug m-3", "pm10": "ug m-3",
    "so2": "ug m-3", "no2": "ug m-3", "co": "mg m-3", "o3": "ug m-3", "elevation": "m", "population": "km-2",
}
STANDARD_NAMES = {  # CF standard names of the simulated dynamic fields
    "u": "eastward_wind", "v": "northward_wind", "temp": "air_temperature", "rh": "relative_humidity",
    "psfc": "surface_air_pressure", "pm25": "mass_concentration_of_pm2p5_ambient_aerosol_particles_in_air",
    "pm10": "mass_concentration_of_pm10_ambient_aerosol_particles_in_air",
    "so2": "mass_concentration_of_sulfur_dioxide_in_air", "no2": "mass_concentration_of_nitrogen_dioxide_in_air",
    "co": "mass_concentration_of_carbon_monoxide_in_air", "o3": "mass_concentration_of_ozone_in_air",
}
CONVERSIONS = {  # (canonical, declared) -> (scale, offset): declared = canonical * scale + offset
    ("K", "degC"): (1.0, -273.15), ("Pa", "hPa"): (0.01, 0.0), ("%", "1"): (0.01, 0.0),
    ("ug m-3", "mg m-3"): (1e-3, 0.0), ("mg m-3", "ug m-3"): (1e3, 0.0), ("m", "km"): (1e-3, 0.0),
}


def _sample_config(cfg: PipelineConfig) -> SampleConfig:
    if cfg.data.sample is None:
        raise SampleError("the config has no data.sample section: add `sample: {seed: 0}` under data to write the "
                          "embedded sample, or point data.raw at your own source and run `python -m pipeline build`")
    return cfg.data.sample


def _generator_hash() -> str:
    """Hash of the generator's code, so a changed simulation is never mistaken for an up-to-date file."""
    h = hashlib.sha256()
    for module in (simulate, terrain, sys.modules[__name__]):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def fingerprint(cfg: PipelineConfig) -> str:
    """Hash of everything that shapes the sample's bytes (domain, period, seed, variables, statics, code)."""
    d = cfg.data
    parts = {
        "generator": _generator_hash(),
        "domain": d.domain.model_dump(mode="json"),
        "sample": _sample_config(cfg).model_dump(mode="json"),
        "period": d.period.model_dump(mode="json"),
        "step_hours": d.step_hours,
        "variables": [v.model_dump(mode="json") for v in d.variables],
        "static": d.static.model_dump(mode="json"),
    }
    return sha256_json(parts)[:16]


def _unit_transform(name: str, units: str) -> tuple[float, float]:
    """(scale, offset) from the simulation's units to the declared ones, or a clear error."""
    canonical = CANONICAL_UNITS.get(name)
    if canonical is None:
        raise SampleError(
            f"variable {name!r}: `pipeline sample` cannot simulate it (it simulates {sorted(CANONICAL_UNITS)}); "
            "remove it from data.variables or point data.raw at a real source that has it"
        )
    if units == canonical:
        return 1.0, 0.0
    if (canonical, units) in CONVERSIONS:
        return CONVERSIONS[(canonical, units)]
    accepted = [canonical] + [b for a, b in CONVERSIONS if a == canonical]
    raise SampleError(f"variable {name!r}: units {units!r} are not supported by the sample; declare one of {accepted}")


def existing_fingerprint(path: Path) -> str | None:
    """The fingerprint stored in an existing file, or None if it is not a readable sample."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get(FINGERPRINT_ATTR)
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _block_steps(cfg: PipelineConfig, times: pd.DatetimeIndex) -> int:
    """Time steps per HDF5 chunk and per write: the build's read block, so its reads align with chunks."""
    return min(cfg.build.time_chunk, len(times))


def _create_layout(f: h5netcdf.File, cfg: PipelineConfig, times: pd.DatetimeIndex, lat_desc: np.ndarray,
                   lon: np.ndarray, fp: str) -> None:
    """Dims, CF coordinates, empty dynamic variables and root attrs."""
    d = cfg.data
    f.dimensions = {"time": len(times), "latitude": lat_desc.size, "longitude": lon.size}
    origin = times[0]
    t = f.create_variable("time", ("time",), "i8")
    t[:] = ((times - origin) / pd.Timedelta(hours=1)).to_numpy().astype(np.int64)
    t.attrs.update(units=f"hours since {origin:%Y-%m-%d %H:%M:%S}", calendar="proleptic_gregorian",
                   standard_name="time", axis="T")
    la = f.create_variable("latitude", ("latitude",), "f8", data=lat_desc)
    la.attrs.update(units="degrees_north", standard_name="latitude", long_name="latitude", axis="Y")
    lo = f.create_variable("longitude", ("longitude",), "f8", data=lon)
    lo.attrs.update(units="degrees_east", standard_name="longitude", long_name="longitude", axis="X")
    chunks = (_block_steps(cfg, times), lat_desc.size, lon.size)
    for spec in d.variables:
        if spec.kind == "dynamic":
            # uncompressed: zlib (even level 1 + shuffle) cost ~20x the plain write for files only ~25% smaller
            var = f.create_variable(spec.source, ("time", "latitude", "longitude"), "f4", chunks=chunks)
            var.attrs.update(units=spec.units, standard_name=STANDARD_NAMES[spec.name], long_name=f"{spec.name} (simulated)")
    f.attrs.update(
        Conventions="CF-1.8",
        title="TopoFlow embedded sample: simulated surface meteorology and air quality on real terrain",
        source="pipeline.sample (pipeline/sample/simulate.py) on pvlib Altitude.h5 terrain (Mapzen/tilezen)",
        seed=_sample_config(cfg).seed,
        step_hours=d.step_hours,
        **{FINGERPRINT_ATTR: fp},
    )


STATIC_ATTRS = {
    "elevation": {"standard_name": "surface_altitude", "long_name": "area-mean elevation (pvlib Altitude.h5; sea 0 m)"},
    "population": {"long_name": "synthetic population density (cities in low, flat, moist land)"},
    "loss_mask": {"standard_name": "land_binary_mask", "long_name": "land-sea mask (1 where >= half the cell is land)"},
}


def _write_static(f: h5netcdf.File, fields: dict[str, tuple[np.ndarray, dict]]) -> None:
    """Static (latitude, longitude) variables; `fields` maps source name -> (values, attrs)."""
    for source, (values, attrs) in fields.items():
        var = f.create_variable(source, ("latitude", "longitude"), "f4", data=values[::-1].astype(np.float32))
        var.attrs.update(attrs)


def _static_fields(cfg: PipelineConfig, elevation: np.ndarray, lsm: np.ndarray, population: np.ndarray) -> dict:
    """Source name -> (ascending-latitude values, attrs with units) for every static field the config names."""
    d = cfg.data
    by_name = {"elevation": elevation, "population": population}
    out: dict[str, tuple[np.ndarray, dict]] = {}
    for spec in d.variables:
        if spec.kind == "static":
            scale, offset = _unit_transform(spec.name, spec.units)
            if spec.name not in by_name:
                raise SampleError(f"static variable {spec.name!r}: the sample provides only {sorted(by_name)}")
            out[spec.source] = (by_name[spec.name] * scale + offset, {"units": spec.units, **STATIC_ATTRS[spec.name]})
    scale, offset = _unit_transform("elevation", d.static.elevation_units)
    out.setdefault(d.static.elevation, (elevation * scale + offset,
                                        {"units": d.static.elevation_units, **STATIC_ATTRS["elevation"]}))
    if d.static.loss_mask:
        out[d.static.loss_mask] = (lsm, {"units": "1", **STATIC_ATTRS["loss_mask"]})
    return out


def write_sample(cfg: PipelineConfig, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Simulate and write cfg.data.raw; skip when it already holds the sample of this config."""
    d = cfg.data
    path = Path(d.raw)
    fp = fingerprint(cfg)
    if path.suffix == ".zarr":
        raise SampleError(f"data.raw={path}: the sample is written as NetCDF; give data.raw a .nc name")
    if path.exists() and not overwrite:
        old = existing_fingerprint(path)
        if old == fp:
            print(f"sample {path} is up to date (fingerprint {fp}); nothing to do (--overwrite regenerates it)")
            return path
        if old is None:
            raise SampleError(
                f"{path} exists and was not written by `pipeline sample` (or is unreadable); refusing to replace "
                "it: move it away, point data.raw elsewhere, or pass --overwrite"
            )
        print(f"sample {path} was made from another config or generator (fingerprint {old} -> {fp}); regenerating")
    dynamic = [s for s in d.variables if s.kind == "dynamic"]
    transforms = {s.source: _unit_transform(s.name, s.units) for s in dynamic}
    times = d.times()
    seed = _sample_config(cfg).seed
    grid = Grid.from_domain(d.domain)
    ground = regrid_elevation(d.domain)
    surface = make_surface(grid, ground.elevation, ground.land_fraction, seed)
    statics = _static_fields(cfg, ground.elevation, ground.land_sea_mask, surface.population)
    origin = times[0] - pd.Timedelta(days=SPINUP_DAYS)
    hours = int((times[-1] - origin) / pd.Timedelta(hours=1)) + 1
    sim = Simulation(grid, surface, origin, hours, seed)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5netcdf.File(tmp, "w") as f, tqdm(total=hours, unit="h", desc="sample", disable=not progress) as bar:
            _create_layout(f, cfg, times, grid.lat[::-1], grid.lon, fp)
            _write_static(f, statics)
            steps = _block_steps(cfg, times)  # memory stays bounded at any grid size and period
            block = {s.source: np.empty((steps, *grid.shape), np.float32) for s in dynamic}
            done, last = 0, origin - pd.Timedelta(hours=1)
            for index, (time, fields) in enumerate(sim.run(times)):
                k = index - done
                for spec in dynamic:
                    scale, offset = transforms[spec.source]
                    block[spec.source][k] = (fields[spec.name] * scale + offset)[::-1]
                if k + 1 == steps or index + 1 == len(times):
                    for source, values in block.items():
                        f.variables[source][done : index + 1] = values[: k + 1]
                    done = index + 1
                bar.update(int((time - last) / pd.Timedelta(hours=1)))
                last = time
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote sample {path}: {len(times)} steps x {grid.shape[0]}x{grid.shape[1]} ({fp})")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (section data is used)")
    add_override_argument(parser, "data.step_hours=1")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the file is up to date or foreign")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = load_pipeline_config(args.config, args.overrides)
    write_sample(cfg, overwrite=args.overwrite, progress=args.progress)
    return 0
