"""features.zarr: its template (from the feature table), encodings, record I/O and a checked opener.

The build writes the template first (metadata, coordinates and every static array), then fills the
time arrays block by block with region writes; `inspect` validates against the same table, and
downstream code opens stores through `open_features`, so a half-built, foreign or old-schema store is
caught in one place. Coordinates carry CF attributes, and per-variable units / standard names /
long names are coordinate variables along `var` and `static_var`, so cf-xarray and pint-xarray
work on the store as it is.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numcodecs
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from pipeline.config import BuildConfig
from pipeline.features import FINAL_OUTPUTS, OUTPUTS, STATIC_OUTPUTS, TIME_OUTPUTS, Statics
from pipeline.records import StoreRecord, VariableRecord
from topoflow.errors import StoreError

PROGRESS_GROUP = "build_progress"  # per-block moments (= done flags) and change frames; removed when complete


def partial_path(store: str | Path) -> Path:
    """Where an unfinished build lives; renamed to `store` only when complete."""
    store = Path(store)
    return store.with_name(store.name + ".partial")


def _variable_coords(dim: str, prefix: str, variables: list[VariableRecord]) -> dict[str, Any]:
    """`dim` itself plus `{prefix}_units`, `_standard_name`, `_long_name` along it (CF metadata per variable)."""
    coords: dict[str, Any] = {dim: (dim, np.array([v.name for v in variables], dtype=object))}
    for key in ("units", "standard_name", "long_name"):
        values = [getattr(v, key) or "" for v in variables]
        coords[f"{prefix}_{key}"] = (dim, np.array(values, dtype=object), {"long_name": f"{key} of each {dim}"})
    return coords


def coordinates(record: StoreRecord, times: np.ndarray) -> dict[str, Any]:
    """CF coordinates of the store: time, lat, lon, var, static_var (with per-variable metadata), token, region."""
    d = record.domain
    return {
        "time": ("time", times, {"standard_name": "time", "long_name": "valid time", "axis": "T"}),
        "lat": ("lat", d.latitudes(), {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}),
        "lon": ("lon", d.longitudes(), {"units": "degrees_east", "standard_name": "longitude", "axis": "X"}),
        **_variable_coords("var", "var", [v for v in record.variables if v.kind == "dynamic"]),
        **_variable_coords("static_var", "static", [v for v in record.variables if v.kind == "static"]),
        "token": ("token", np.arange(record.layout.n_tokens),
                  {"long_name": "patch_row * patch_cols + patch_col, rows from south"}),
        "region": ("region", np.arange(record.layout.n_regions),
                   {"long_name": "region_row * region_cols + region_col"}),
    }


def template(record: StoreRecord, times: np.ndarray, statics: Statics, time_chunk: int) -> xr.Dataset:
    """The whole store as a lazy dataset: static arrays computed, time and final arrays as dask zeros
    (to_zarr(compute=False) writes their metadata only).

    Each lazy array is ONE dask chunk and its Zarr chunks are its `encoding["chunks"]`: dask chunks equal to the
    Zarr chunks made a graph of blocks x arrays tasks that to_zarr built and threw away (11 arrays at 128x256:
    0.14 s for 480 hourly steps, 3.0 s for six years; 0.03 s as one chunk each, measured)."""
    coords = coordinates(record, times)
    sizes = {"time": len(times), "var": len(record.names("dynamic")), "static_var": len(record.names("static")),
             "lat": record.domain.n_lat, "lon": record.domain.n_lon, "token": record.layout.n_tokens,
             "region": record.layout.n_regions}
    data_vars = {}
    for out in (*TIME_OUTPUTS, *FINAL_OUTPUTS):
        shape = tuple(sizes[d] for d in out.dims)
        chunks = tuple(time_chunk if d == "time" else dict(out.chunks).get(d, sizes[d]) for d in out.dims)
        data_vars[out.name] = xr.Variable(out.dims, da.zeros(shape, dtype=out.dtype_for(record), chunks=-1), out.attrs,
                                          encoding={"chunks": tuple(min(c, n) for c, n in zip(chunks, shape))})
    for out in STATIC_OUTPUTS:
        data_vars[out.name] = (out.dims, np.asarray(out.compute(statics), dtype=out.dtype_for(record)), out.attrs)
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs = record.model_dump(mode="json")
    return ds


def encodings(ds: xr.Dataset, build: BuildConfig) -> dict[str, dict[str, Any]]:
    """Blosc (build.compressor) with byte shuffle for every data array; hours since the first step for time."""
    name, level = build.compressor, build.compressor_level
    if build.zarr_format == 3:
        codec: Any = BloscCodec(cname=name, clevel=level, shuffle="shuffle")
    else:
        codec = numcodecs.Blosc(cname=name, clevel=level, shuffle=numcodecs.Blosc.SHUFFLE)
    out: dict[str, dict[str, Any]] = {n: {"compressors": (codec,)} for n in ds.data_vars}
    first = np.datetime_as_string(ds["time"].values[0], unit="s").replace("T", " ")
    out["time"] = {"units": f"hours since {first}", "calendar": "proleptic_gregorian", "dtype": "int64"}
    return out


def consolidate(path: str | Path) -> None:
    """Refresh consolidated metadata (xarray opens stores through it); quiet about v3's extension status."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def read_attrs(path: str | Path) -> dict[str, Any] | None:
    """Root attrs of a Zarr group, or None when `path` is not a readable Zarr group."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # not a group, or unreadable metadata: both mean "not a feature store"
        return None


def read_record(path: str | Path) -> StoreRecord:
    """The record of the store at `path`; a foreign, damaged or other-schema store is a StoreError."""
    attrs = read_attrs(path)
    if attrs is None:
        raise StoreError(f"{path} is not a readable Zarr group: rebuild it with `python -m pipeline build`")
    return StoreRecord.from_attrs(attrs, str(path), StoreError)


def open_features(path: str | Path) -> tuple[xr.Dataset, StoreRecord]:
    """A finished feature store, opened lazily, with its record; a missing, unfinished or foreign
    store is a StoreError saying what to run."""
    path = Path(path)
    if not path.exists():
        hint = " (an unfinished build exists: rerun `python -m pipeline build` to resume it)" \
            if partial_path(path).exists() else ""
        raise StoreError(f"feature store {path} does not exist{hint}; run `python -m pipeline build --config ...`")
    record = read_record(path)
    if record.build_state != "complete":
        raise StoreError(f"feature store {path} is unfinished (build_state={record.build_state!r}); "
                         "rerun `python -m pipeline build` to finish it")
    return xr.open_zarr(path, consolidated=True), record


def schema_problems(ds: xr.Dataset, record: StoreRecord) -> list[str]:
    """Arrays missing, or with other dims/dtypes than the feature table says."""
    problems = []
    for name, out in OUTPUTS.items():
        if name not in ds:
            problems.append(f"array {name!r} is missing")
        elif ds[name].dims != out.dims or ds[name].dtype != out.dtype_for(record):
            problems.append(f"array {name!r} is {ds[name].dims} {ds[name].dtype}, "
                            f"expected {out.dims} {out.dtype_for(record)}")
    return problems
