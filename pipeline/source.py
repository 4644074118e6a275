"""The raw source: checked before anything is written, read one time block at a time by the build.

Every check names the variable or file at fault, what was expected, what was found and the fix, so
a user never has to debug a half-built store. `describe_source` runs the metadata checks and reads
the statics once (in the main process); `read_block` is what a build task calls on a worker: it
reads each dynamic variable of one time block exactly once. NaN checks of the dynamic fields run
inside those tasks, so the data is read only once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.config import PipelineConfig
from pipeline.records import VariableRecord
from pipeline.statistics import layer_sums
from topoflow.errors import SourceError

SOURCE_DIMS = ("time", "latitude", "longitude")


@dataclass(frozen=True)
class SourceStatics:
    """What the build takes from the source once: static channels, barrier elevation, loss mask,
    the variables' CF names, and the store times the source lacks."""

    static: np.ndarray  # (S, H, W) float32, latitude ascending, physical units
    elevation: np.ndarray  # (H, W) float32, m
    loss_mask: np.ndarray  # (H, W) bool
    variables: list[VariableRecord]
    missing_times: list[str]


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int) -> xr.Dataset:
    """The source, opened lazily without dask (a build task indexes it directly); cached per process."""
    try:
        if Path(path).is_dir() or path.endswith(".zarr"):
            return xr.open_zarr(path, chunks=None)
        return xr.open_dataset(path, engine="h5netcdf", chunks=None)
    except Exception as exc:  # any backend failure means the same thing to the user
        raise SourceError(
            f"raw source {path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
            "regenerate or re-download it (NetCDF or Zarr with dims time, latitude, longitude)"
        ) from exc


def open_raw(cfg: PipelineConfig) -> xr.Dataset:
    path = Path(cfg.data.raw)
    if not path.exists():
        raise SourceError(f"raw source {path} does not exist: run `python -m pipeline sample --config ...` "
                          "or set data.raw")
    return _open(str(path), path.stat().st_mtime_ns)


def _check_variable(ds: xr.Dataset, name: str, source: str, units: str, dims: tuple[str, ...]) -> None:
    if source not in ds.data_vars:
        raise SourceError(
            f"variable {name!r}: source variable {source!r} is missing from the raw source; it holds "
            f"{sorted(map(str, ds.data_vars))}. Fix the `source:` name in the config or add the variable"
        )
    found = ds[source].dims
    if set(found) != set(dims):
        raise SourceError(
            f"variable {name!r} (source {source!r}) has dims {found}, expected {dims}; "
            "rename or select the dims in the source (e.g. drop a level dim) before building"
        )
    got = ds[source].attrs.get("units")
    if got != units:
        raise SourceError(
            f"variable {name!r} (source {source!r}): units declared in the config {units!r} but found {got!r} "
            f"in the source; convert the source to {units!r}, or declare units: {got!r} if that is intended"
        )


def _check_grid(ds: xr.Dataset, cfg: PipelineConfig) -> None:
    d = cfg.data.domain
    lat = np.sort(ds["latitude"].values.astype(np.float64))
    lon = ds["longitude"].values.astype(np.float64)
    want_lat, want_lon = d.latitudes(), d.longitudes()
    tol = 1e-3 * d.resolution
    ok = (lat.shape == want_lat.shape and lon.shape == want_lon.shape
          and np.allclose(lat, want_lat, atol=tol, rtol=0) and np.allclose(lon, want_lon, atol=tol, rtol=0))
    if not ok:
        res = float(np.median(np.diff(lat))) if lat.size > 1 else float("nan")
        raise SourceError(
            f"raw source grid ({lat.size}x{lon.size} cells, lat {lat.min():.4f}..{lat.max():.4f}, "
            f"lon {lon.min():.4f}..{lon.max():.4f}) does not match data.domain ({d.n_lat}x{d.n_lon} cells, "
            f"lat {want_lat[0]:.4f}..{want_lat[-1]:.4f}, lon {want_lon[0]:.4f}..{want_lon[-1]:.4f}); "
            f"set data.domain to lat_south={lat.min() - res / 2:g}, lon_west={lon.min() - res / 2:g}, "
            f"resolution={res:g}, n_lat={lat.size}, n_lon={lon.size} or regrid the source"
        )


def _check_time(ds: xr.Dataset, cfg: PipelineConfig) -> pd.DatetimeIndex:
    """The store times the source lacks; a source with another step or outside the splits is an error."""
    times = pd.DatetimeIndex(ds["time"].values)
    if len(times) < 1 or not times.is_monotonic_increasing or not times.is_unique:
        raise SourceError("raw source time coordinate must be non-empty, strictly increasing and unique; sort it")
    step = cfg.data.step_hours
    if len(times) > 1 and not (np.diff(times.values) % np.timedelta64(step, "h") == np.timedelta64(0)).all():
        found = sorted({str(pd.Timedelta(x)) for x in np.diff(times.values)})
        raise SourceError(
            f"raw source time steps {found} are not multiples of data.step_hours={step}: leads are counted in "
            "steps, so resample the source to a regular step or set step_hours to match")
    wanted = cfg.data.times()
    train = cfg.data.splits["train"]
    if not ((times >= train.start) & (times <= train.end)).any():
        raise SourceError(
            f"the train split {train.start}..{train.end} holds no time step of the source "
            f"({times[0]}..{times[-1]}); statistics need it: fix data.splits.train")
    return wanted.difference(times)


def check_finite(sums: np.ndarray, names: list[str], times: np.ndarray | None = None) -> None:
    """Raise naming the first variable (and time) holding NaN/inf.

    `sums` are float64 sums of each (time, variable) layer, (t, V), or of each static layer, (V,):
    a float64 sum of float32 cells is finite exactly when every cell is, so the check needs no pass
    of its own (`statistics.layer_sums` feeds both this check and the moments).
    """
    bad = ~np.isfinite(sums)
    if not bad.any():
        return
    if times is None:
        raise SourceError(f"static variable {names[int(np.argmax(bad))]!r} contains NaN/inf; fill or mask those "
                          "cells in the source")
    t, var = np.argwhere(bad)[0]  # rows in time order: the first bad time, then its first variable
    raise SourceError(
        f"variable {names[var]!r} contains NaN/inf, first at time {pd.Timestamp(times[t])}; fill the gap "
        "in the source (interpolate) or trim data.splits to exclude it")


def _static_layer(ds: xr.Dataset, source: str) -> np.ndarray:
    return ds[source].transpose("latitude", "longitude").sortby("latitude").values.astype(np.float32)


def _variable_records(ds: xr.Dataset, cfg: PipelineConfig) -> list[VariableRecord]:
    records = []
    for spec in cfg.data.variables:
        attrs = ds[spec.source].attrs if spec.source else {"standard_name": spec.name, "long_name": spec.name}
        records.append(VariableRecord(name=spec.name, kind=spec.kind, units=spec.units,
                                      standard_name=attrs.get("standard_name"), long_name=attrs.get("long_name")))
    return records


def describe_source(cfg: PipelineConfig) -> SourceStatics:
    """Check the source's dims, grid, time axis, variables and units, and read its statics."""
    data, ds = cfg.data, open_raw(cfg)
    for dim in SOURCE_DIMS:
        if dim not in ds.dims:
            raise SourceError(f"raw source {data.raw} has no {dim!r} dim (dims: {sorted(map(str, ds.dims))}); "
                              f"rename its dims to {SOURCE_DIMS}")
    _check_grid(ds, cfg)
    missing = _check_time(ds, cfg)
    for spec in data.variables:
        if spec.kind != "coordinate":
            dims = SOURCE_DIMS if spec.kind == "dynamic" else SOURCE_DIMS[1:]
            _check_variable(ds, spec.name, spec.source, spec.units, dims)
    _check_variable(ds, "elevation (data.static)", data.static.elevation, data.static.elevation_units, SOURCE_DIMS[1:])
    mask = data.static.loss_mask
    if mask and (mask not in ds.data_vars or set(ds[mask].dims) != set(SOURCE_DIMS[1:])):
        raise SourceError(f"loss mask {mask!r} (data.static.loss_mask) is missing or not (latitude, longitude) in "
                          f"the source, which holds {sorted(map(str, ds.data_vars))}; fix the name or set loss_mask: null")
    names = data.names_of("static")
    layers = [_static_layer(ds, s.source) for s in data.variables if s.kind == "static"]
    elevation = _static_layer(ds, data.static.elevation)
    check_finite(layer_sums(np.stack([*layers, elevation])[None])[0], [*names, "elevation"])
    shape = (data.domain.n_lat, data.domain.n_lon)
    return SourceStatics(
        static=np.stack(layers) if layers else np.empty((0, *shape), np.float32),
        elevation=elevation,
        loss_mask=_static_layer(ds, mask) >= 0.5 if mask else np.ones(shape, dtype=bool),
        variables=_variable_records(ds, cfg),
        missing_times=[t.isoformat() for t in missing],
    )


def read_block(cfg: PipelineConfig, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fields (t, V_dynamic, H, W) float32 with latitude ascending, valid (t,)) for the store times `times`.

    Each dynamic variable is read once, as one contiguous slab; times the source lacks are NaN and
    not valid.
    """
    ds = open_raw(cfg)
    source_times = ds["time"].values.astype("datetime64[ns]")
    pos = np.searchsorted(source_times, times)
    valid = (pos < len(source_times)) & (source_times[np.minimum(pos, len(source_times) - 1)] == times)
    d = cfg.data.domain
    fields = np.full((len(times), len(cfg.data.dynamic_names), d.n_lat, d.n_lon), np.nan, dtype=np.float32)
    if valid.any():
        first, last = int(pos[valid].min()), int(pos[valid].max())
        descending = ds["latitude"].values[0] > ds["latitude"].values[-1]
        for i, spec in enumerate(s for s in cfg.data.variables if s.kind == "dynamic"):
            slab = ds[spec.source].transpose(*SOURCE_DIMS)[first:last + 1].values
            fields[valid, i] = slab[pos[valid] - first, ::-1 if descending else 1]
    return fields, valid
