"""A source's files, opened lazily and normalised, and the one time index over all of them.

Normalised here (each has a test in tests/pipeline/test_sources.py):
- `valid_time` (the new CDS NetCDF) is the time dim; a source without one is static;
- the `number` coordinate (ensemble member) is dropped; `expver` is kept as each time's release;
- latitude/longitude are found by CF attributes (cf-xarray), 1-D (rectilinear) or 2-D (curvilinear);
- files are combined along time: a time in two files is dropped if identical, the final ERA5 release
  (lowest expver, 0001) wins over ERA5T (0005) and the log says so, anything else is an error naming
  both files.
Packed integers (scale_factor/add_offset) and _FillValue are decoded by xarray when reading.

Reading a time block (`Catalog.read`): where xarray's decoding would leave the stored values as they
are (a float variable, not packed, no fill value but NaN) and the file is NetCDF-4, the hyperslab is
read with h5py directly, skipping the backend's per-call Python overhead (same bytes). Measured on 11
variables x 24 steps x 128 x 256: a block's `read_block` took 35 ms CPU through xarray/h5netcdf and 27
through h5py from an uncompressed file; the 11 reads alone from zlib-compressed files (the new CDS
format) took 122 vs 110 ms CPU, decompression being most of it. Everything else (packed
integers, masked fill values, `expver` dims, one time per file, Zarr) goes through xarray.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cf_xarray  # noqa: F401 - registers ds.cf
import h5py
import numpy as np
import xarray as xr

from pipeline.recipe import SourceSpec
from topoflow.errors import SourceError

log = logging.getLogger("pipeline")
DECODING = ("scale_factor", "add_offset", "missing_value", "_Unsigned")  # encodings that change stored values


def _is_zarr(path: str) -> bool:
    return Path(path).is_dir() or path.endswith(".zarr")


@functools.lru_cache(maxsize=64)
def _open(path: str, mtime_ns: int) -> xr.Dataset:
    """A file or Zarr store, opened lazily without dask (blocks index it directly); cached per process."""
    try:
        if _is_zarr(path):
            ds = xr.open_zarr(path, chunks=None)
        else:
            ds = xr.open_dataset(path, engine="h5netcdf", chunks=None)
    except Exception as exc:  # any backend failure means the same thing to the user
        raise SourceError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}); re-download or "
                          "regenerate it (NetCDF-4 or Zarr)") from exc
    if "valid_time" in ds.dims and "time" not in ds.dims:
        ds = ds.rename({"valid_time": "time"})
    if "number" in ds.dims and ds.sizes["number"] > 1:
        raise SourceError(f"{path} holds {ds.sizes['number']} ensemble members (`number`): download one member "
                          "or select one before building")
    return ds.squeeze("number", drop=True) if "number" in ds.dims else ds.drop_vars("number", errors="ignore")


def open_file(path: str | Path) -> xr.Dataset:
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path} does not exist: check the source's `files`, or run `python -m pipeline sample`")
    return _open(str(path), path.stat().st_mtime_ns)


def coordinate(ds: xr.Dataset, axis: str, path: str) -> xr.DataArray:
    """The latitude or longitude of a file, by CF attributes or by name, 1-D or 2-D."""
    try:
        return ds.cf[axis]
    except KeyError:
        for name in {"latitude": ("latitude", "lat", "lat2d"), "longitude": ("longitude", "lon", "lon2d")}[axis]:
            if name in ds.variables:
                return ds[name]
    raise SourceError(f"{path} has no {axis} coordinate (no CF-named variable, no `{axis}`): a curvilinear file "
                      f"needs its 2-D {axis} as a variable; add it, or regrid the file first")


@dataclass(frozen=True)
class Catalog:
    """One source: its files, grid, and for each of its times (sorted) the file and position holding it."""

    source: SourceSpec
    files: tuple[str, ...]
    lat: np.ndarray  # (ny,) or (ny, nx)
    lon: np.ndarray
    times: np.ndarray  # datetime64[ns], sorted, unique; empty for a static source
    file_of: np.ndarray  # int, per time
    index_in_file: np.ndarray  # int, per time

    @property
    def static(self) -> bool:
        return len(self.times) <= 1  # the CDS delivers invariant fields with one valid_time

    @property
    def curvilinear(self) -> bool:
        return self.lat.ndim == 2

    def dataset(self, file: int) -> xr.Dataset:
        return open_file(self.files[file])

    def read(self, file: int, name: str, positions: np.ndarray) -> np.ndarray:
        """(len(positions), y, x) of one recipe variable of one file at those time positions: through h5py
        where that gives xarray's values (`hdf5_key`), else through xarray (`read_layer`)."""
        path, chosen = self.files[file], self.source.selection(name)
        mtime = Path(path).stat().st_mtime_ns
        found = None if _is_zarr(path) else hdf5_key(path, mtime, chosen.var, tuple(sorted(chosen.select.items())))
        if found is None:
            return read_layer(self.dataset(file), self.source, name, positions)
        key, axis = found
        dataset = _hdf5_file(path, mtime)[chosen.var]  # looked up per call: only the file cache holds files open
        return _at_positions(lambda times: dataset[(*key[:axis], times, *key[axis + 1:])], positions)


def _check_file(ds: xr.Dataset, path: str, source: SourceSpec, grid: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Every recipe variable is in the file, with its selections, on the first file's grid."""
    for name, chosen in source.variables.items():
        if chosen.var not in ds.data_vars:
            raise SourceError(f"source {source.name!r}: {path} lacks {chosen.var!r} (for {name!r}); it holds "
                              f"{sorted(map(str, ds.data_vars))}. Re-download that file, or fix the recipe")
        for dim, value in chosen.select.items():
            if dim not in ds[chosen.var].dims or value not in ds[dim].values:
                raise SourceError(f"source {source.name!r}: {path}: {chosen.var!r} has no {dim}={value!r} "
                                  f"(dims {ds[chosen.var].dims}); fix `select` or re-download with that level")
    if grid is not None:
        lat, lon = coordinate(ds, "latitude", path).values, coordinate(ds, "longitude", path).values
        if lat.shape != grid[0].shape or lon.shape != grid[1].shape or not (
                np.allclose(lat, grid[0]) and np.allclose(lon, grid[1])):
            raise SourceError(f"source {source.name!r}: {path} is on another grid ({lat.shape} x {lon.shape}) than "
                              "the source's first file: every file of one source must share its grid")


def _time_from_name(path: Path, source: SourceSpec) -> np.ndarray:
    try:
        stamp = dt.datetime.strptime(path.name, source.filename_time)
    except ValueError:
        raise SourceError(f"source {source.name!r}: file name {path.name!r} does not match filename_time "
                          f"{source.filename_time!r}; fix the pattern or the `files` glob") from None
    return np.array([np.datetime64(stamp - dt.timedelta(hours=source.utc_offset_hours), "ns")])


def _file_times(ds: xr.Dataset, path: Path, source: SourceSpec) -> tuple[np.ndarray, np.ndarray]:
    """(UTC times, release rank) of one file; rank = expver as a number (0001 final < 0005 ERA5T), else 0."""
    if source.filename_time:
        if "time" in ds.dims and ds.sizes["time"] != 1:
            raise SourceError(f"source {source.name!r}: {path} has {ds.sizes['time']} time steps but filename_time "
                              "says one per file; drop filename_time to read its time coordinate")
        return _time_from_name(path, source), np.zeros(1, dtype=int)
    if not any("time" in ds[v.var].dims for v in source.variables.values()):  # a static source (maybe in a
        return np.array([], dtype="datetime64[ns]"), np.array([], dtype=int)   # file with dynamic fields too)
    times = ds["time"].values.astype("datetime64[ns]") - np.timedelta64(source.utc_offset_hours, "h")
    if "expver" in ds.coords and ds["expver"].dims == ("time",):
        return times, np.array([int(str(v)) for v in ds["expver"].values])
    return times, np.zeros(len(times), dtype=int)


def _merge_releases(data: xr.DataArray) -> np.ndarray:
    """Values of `data`; the old CDS format's `expver` dim (ERA5 and ERA5T side by side, NaN where absent)
    merged: the final release (lowest expver) where it has data, else the next one."""
    if "expver" not in data.dims:
        return data.values
    releases = data.sortby("expver").transpose("expver", ...).values
    merged = releases[0]
    for later in releases[1:]:
        merged = np.where(np.isfinite(merged), merged, later)
    return merged


def _at_positions(read: Callable[[slice], np.ndarray], positions: np.ndarray) -> np.ndarray:
    """The time positions `positions` of a variable whose `read(slice)` gives (times, y, x): one contiguous slab."""
    first, last = int(positions.min()), int(positions.max())
    slab = read(slice(first, last + 1))
    return slab if len(positions) == last - first + 1 and (np.diff(positions) == 1).all() else slab[positions - first]


def _decodes_to_itself(var: xr.DataArray) -> bool:
    """xarray's CF decoding returns this variable's stored values unchanged: stored and read as the same
    float dtype, not packed, and a fill value (if any) that is NaN, so masking it changes nothing."""
    encoding = var.encoding
    fill = encoding.get("_FillValue")
    return (var.dtype.kind == "f" and np.dtype(encoding.get("dtype", var.dtype)) == var.dtype
            and not any(k in encoding for k in DECODING) and (fill is None or bool(np.isnan(fill))))


@functools.lru_cache(maxsize=1024)
def hdf5_key(path: str, mtime_ns: int, var: str, select: tuple[tuple[str, object], ...]
             ) -> tuple[tuple[int | slice, ...], int] | None:
    """The key into the h5py dataset of `var` in a NetCDF-4 file that gives what `read_layer` gives (the
    `select` positions, 0 for other singleton dims, every y and x) and where the time slice goes in it;
    None where only xarray reads it right (decoded values, `expver`, no time dim, dims xarray dropped).
    Cached per process, like the opened files."""
    variable, chosen = open_file(path)[var], dict(select)
    if not _decodes_to_itself(variable) or "expver" in variable.dims or "time" not in variable.dims:
        return None
    key: list[int | slice] = []
    for axis, dim in enumerate(variable.dims):
        if dim in chosen:
            found = variable.indexes[dim].get_loc(chosen[dim]) if dim in variable.indexes else None
            if not isinstance(found, (int, np.integer)):
                return None
            key.append(found)
        elif dim == "time" or axis >= variable.ndim - 2:
            key.append(slice(None))
        elif variable.sizes[dim] == 1:
            key.append(0)
        else:
            return None  # read_layer names the dims left to select
    kept = [d for d, k in zip(variable.dims, key) if isinstance(k, slice)]
    if kept[0] != "time" or len(kept) != 3 or _hdf5_file(path, mtime_ns)[var].shape != variable.shape:
        return None
    return tuple(key), variable.dims.index("time")


@functools.lru_cache(maxsize=64)
def _hdf5_file(path: str, mtime_ns: int) -> h5py.File:
    """A NetCDF-4 file opened read-only with h5py; cached per process, like `_open`."""
    return h5py.File(path, "r")


def read_layer(ds: xr.Dataset, source: SourceSpec, name: str, positions: np.ndarray | None) -> np.ndarray:
    """One recipe variable of one file: (len(positions), y, x) at those time positions, or (y, x) for a
    static source (positions None). Selections applied, each file read as one contiguous slab."""
    chosen = source.selection(name)
    data = ds[chosen.var].sel(chosen.select)
    extra = [d for d in data.dims[:-2] if d not in ("time", "expver")]  # e.g. CAQRA's leading singleton axis
    if any(data.sizes[d] != 1 for d in extra):
        raise SourceError(f"source {source.name!r}: {chosen.var!r} keeps the dims {extra} after `select`; select "
                          "one value of each (e.g. select: {model_level: 60})")
    data = data.squeeze(extra, drop=True)
    if positions is None:
        return _merge_releases(data.isel(time=0) if "time" in data.dims else data)
    if "time" not in data.dims:  # one time per file (filename_time)
        return np.repeat(_merge_releases(data)[None], len(positions), axis=0)
    return _at_positions(lambda times: _merge_releases(data.isel(time=times)), positions)


def _same_data(source: SourceSpec, a: tuple[xr.Dataset, int], b: tuple[xr.Dataset, int]) -> bool:
    return all(np.array_equal(read_layer(a[0], source, n, np.array([a[1]])),
                              read_layer(b[0], source, n, np.array([b[1]])), equal_nan=True) for n in source.variables)


def _resolve_duplicates(source: SourceSpec, paths: list[Path], times: np.ndarray, ranks: np.ndarray,
                        files: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Positions (into the sorted entries) to keep: one per time, the final release first."""
    keep = np.ones(len(times), dtype=bool)
    later = np.flatnonzero(times[1:] == times[:-1]) + 1  # entries sorted by (time, rank, file)
    replaced = 0
    for j in later:
        first = j - 1
        while not keep[first]:
            first -= 1
        keep[j] = False
        if ranks[j] != ranks[first]:
            replaced += 1
            continue
        ds_a, ds_b = open_file(paths[files[first]]), open_file(paths[files[j]])
        if not _same_data(source, (ds_a, int(index[first])), (ds_b, int(index[j]))):
            raise SourceError(f"source {source.name!r}: {np.datetime_as_string(times[j], 'm')} is in both "
                              f"{paths[files[first]]} and {paths[files[j]]} with different data: remove one of "
                              "them (or the overlap) from `files`")
    if replaced:
        log.info("source %s: %d time(s) are in two releases; the final one (lowest expver) is kept", source.name,
                 replaced)
    if len(later) > replaced:
        log.info("source %s: %d duplicated time(s) with identical data dropped", source.name, len(later) - replaced)
    return keep


def build_catalog(source: SourceSpec) -> Catalog:
    """Open every file of `source` (metadata only), check it, and index its times."""
    paths = source.paths()
    if not paths:
        raise SourceError(f"source {source.name!r}: `files` {source.files!r} matches no file; fix the path or glob, "
                          "or download the data (`python -m pipeline requests --config ...` prints the requests)")
    grid, entries = None, []
    for f, path in enumerate(paths):
        ds = open_file(path)
        _check_file(ds, str(path), source, grid)
        if grid is None:
            grid = (coordinate(ds, "latitude", str(path)).values, coordinate(ds, "longitude", str(path)).values)
        times, ranks = _file_times(ds, Path(path), source)
        entries.append((times, ranks, np.full(len(times), f), np.arange(len(times))))
    times, ranks, files, index = (np.concatenate(parts) for parts in zip(*entries))
    if 0 < len(times) and any(len(e[0]) == 0 for e in entries):
        raise SourceError(f"source {source.name!r} mixes files with and without a time dim; keep static fields "
                          "(e.g. geopotential, land-sea mask) in a source of their own")
    order = np.lexsort((files, ranks, times))
    times, ranks, files, index = times[order], ranks[order], files[order], index[order]
    keep = _resolve_duplicates(source, paths, times, ranks, files, index)
    return Catalog(source, tuple(map(str, paths)), grid[0], grid[1], times[keep], files[keep], index[keep])
