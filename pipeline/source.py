"""Open and validate the raw source before anything is written.

Every check names the variable or file at fault, what was expected, what was found and the fix, so
a user never has to debug a half-built store. Checks that need the full data (NaNs in the dynamic
fields) run inside the build's blocks through `check_finite`, so the data is read only once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.config import PipelineConfig

SOURCE_DIMS = ("time", "latitude", "longitude")
ELEVATION = "static_elevation"  # names of the static helpers in the opened source
LOSS_MASK = "static_loss_mask"


class SourceError(ValueError):
    """The raw source cannot be used; the message names the variable or file and the fix."""


def source_fingerprint(path: str | Path) -> str:
    """Cheap identity of the raw source (name, sizes, mtimes of its files): changes when it is rewritten."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(path.name.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _open(path: Path, time_chunk: int) -> xr.Dataset:
    if not path.exists():
        raise SourceError(
            f"raw source {path} does not exist: run `python -m pipeline sample --config ...` or set data.raw"
        )
    try:
        if path.is_dir() or path.suffix == ".zarr":
            return xr.open_zarr(path, chunks={"time": time_chunk})
        return xr.open_dataset(path, chunks={"time": time_chunk})
    except Exception as exc:  # any backend failure means the same thing to the user
        raise SourceError(
            f"raw source {path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
            "regenerate or re-download it (NetCDF or Zarr with dims time, latitude, longitude)"
        ) from exc


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
    want_lat, want_lon = np.array(d.latitudes()), np.array(d.longitudes())
    tol = 1e-3 * d.resolution
    ok = (
        lat.shape == want_lat.shape
        and lon.shape == want_lon.shape
        and np.allclose(lat, want_lat, atol=tol, rtol=0)
        and np.allclose(lon, want_lon, atol=tol, rtol=0)
    )
    if not ok:
        res = float(np.median(np.diff(lat))) if lat.size > 1 else float("nan")
        raise SourceError(
            f"raw source grid ({lat.size}x{lon.size} cells, lat {lat.min():.4f}..{lat.max():.4f}, "
            f"lon {lon.min():.4f}..{lon.max():.4f}) does not match data.domain ({d.n_lat}x{d.n_lon} cells, "
            f"lat {want_lat[0]:.4f}..{want_lat[-1]:.4f}, lon {want_lon[0]:.4f}..{want_lon[-1]:.4f}); "
            f"set data.domain to lat_south={lat.min() - res / 2:g}, lon_west={lon.min() - res / 2:g}, "
            f"resolution={res:g}, n_lat={lat.size}, n_lon={lon.size} or regrid the source"
        )


def _check_time(ds: xr.Dataset, cfg: PipelineConfig) -> None:
    times = pd.DatetimeIndex(ds["time"].values)
    if len(times) < 1 or not times.is_monotonic_increasing or not times.is_unique:
        raise SourceError("raw source time coordinate must be non-empty, strictly increasing and unique; sort it")
    step = cfg.data.sample.step_hours
    if len(times) > 1 and not (np.diff(times.values) == np.timedelta64(step, "h")).all():
        found = sorted({str(pd.Timedelta(x)) for x in np.diff(times.values)})
        raise SourceError(
            f"raw source time steps {found} differ from data.sample.step_hours={step}: leads are counted in "
            "steps, so resample the source to a regular step or set step_hours to match"
        )
    train = cfg.data.splits["train"]
    if not ((times >= train.start) & (times <= train.end)).any():
        raise SourceError(
            f"the train split {train.start}..{train.end} holds no time step of the source "
            f"({times[0]}..{times[-1]}); statistics need it: fix data.splits.train"
        )


def check_finite(values: np.ndarray, names: list[str], times: np.ndarray | None = None) -> None:
    """Raise naming the first variable (and time) holding NaN/inf; values is (time, var, ...) or (var, ...)."""
    lead = 2 if times is not None else 1
    # a float64 sum of float32 cells is finite exactly when every cell is: one fast pass, no mask array
    bad = ~np.isfinite(values.reshape(*values.shape[:lead], int(np.prod(values.shape[lead:]))).sum(axis=-1, dtype=np.float64))
    if not bad.any():
        return
    if times is None:
        var = names[int(np.argmax(bad))]
        raise SourceError(f"static variable {var!r} contains NaN/inf; fill or mask those cells in the source")
    t, var = np.argwhere(bad)[0]  # rows in time order: the first bad time, then its first variable
    raise SourceError(
        f"variable {names[var]!r} contains NaN/inf, first at time {pd.Timestamp(times[t])}; fill the gap "
        "in the source (interpolate) or trim data.sample.period/splits to exclude it"
    )


def open_source(cfg: PipelineConfig) -> xr.Dataset:
    """Validated raw source: model variable names, dims (time, lat, lon), latitude ascending, time-chunked.

    Static helpers come as `static_elevation` and (when configured) `static_loss_mask`; coordinate
    variables (lat2d/lon2d) are derived later from the grid. Close it (or use `with`) to release the file.
    """
    data = cfg.data
    path = Path(data.raw)
    ds = _open(path, cfg.build.time_chunk)
    for dim in SOURCE_DIMS:
        if dim not in ds.dims:
            raise SourceError(
                f"raw source {path} has no {dim!r} dim (dims: {sorted(map(str, ds.dims))}); "
                f"rename its dims to {SOURCE_DIMS}"
            )
    _check_grid(ds, cfg)
    _check_time(ds, cfg)
    out = {}
    for spec in data.variables:
        if spec.kind == "coordinate":
            continue
        dims = SOURCE_DIMS if spec.kind == "dynamic" else SOURCE_DIMS[1:]
        _check_variable(ds, spec.name, spec.source, spec.units, dims)
        out[spec.name] = ds[spec.source].transpose(*dims)
    _check_variable(ds, "elevation (data.static)", data.static.elevation, data.static.elevation_units, SOURCE_DIMS[1:])
    out[ELEVATION] = ds[data.static.elevation].transpose(*SOURCE_DIMS[1:])
    if data.static.loss_mask:
        mask = data.static.loss_mask
        if mask not in ds.data_vars or set(ds[mask].dims) != set(SOURCE_DIMS[1:]):
            raise SourceError(
                f"loss mask {mask!r} (data.static.loss_mask) is missing or not (latitude, longitude) in the "
                f"source, which holds {sorted(map(str, ds.data_vars))}; fix the name or set loss_mask: null"
            )
        out[LOSS_MASK] = ds[mask].transpose(*SOURCE_DIMS[1:])
    result = xr.Dataset(out).rename({"latitude": "lat", "longitude": "lon"}).sortby("lat")
    static = [n for n in result.data_vars if "time" not in result[n].dims]
    result[static] = result[static].load()
    check_finite(np.stack([result[n].values for n in static]), static)
    result = result.drop_attrs(deep=False)
    result.set_close(ds.close)
    return result

