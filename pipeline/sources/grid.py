"""From a source's grid to the target grid: coverage check, then regridding.

Rectilinear sources (1-D lat/lon, any order, longitudes 0..360 or -180..180, a domain across the seam
included) are regridded separably, out = W_lat @ field @ W_lon.T, with per-axis weight matrices built
once per source from the libraries' own weights: xarray-regrid's conservative overlaps (with its
cos-latitude correction), xarray's linear/nearest interpolation of an identity basis. Why not
`ds.regrid.*` per block: it rebuilds and applies the weights through xarray for every variable of
every block, 30-120 ms each at 24 x 128 x 256 (measured), several times a whole build task.
Curvilinear sources (2-D lat/lon, e.g. CAQRA's projected grid) go through pyresample: nearest
(kd-tree), bilinear, or a bucket average of the source points inside each target cell (conservative).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import xarray as xr
from xarray_regrid.methods.conservative import get_weights, lat_weight

from pipeline.config import DomainConfig
from pipeline.recipe import Regrid
from pipeline.sources.files import Catalog
from topoflow.errors import SourceError

EARTH_RADIUS_M = 6.371e6


def _spacing(coords: np.ndarray) -> float:
    return float(np.median(np.abs(np.diff(coords)))) if coords.size > 1 else 360.0


def _needed(lo: float, hi: float, res: float, method: Regrid) -> tuple[float, float]:
    """The span of the target a source must cover: cell edges (conservative) or cell centres."""
    half = res / 2 if method == "conservative" else 0.0
    return lo - half, hi + half


def _extent(coords: np.ndarray, spacing: float, method: Regrid) -> tuple[float, float]:
    """What the source covers: its cells' edges (conservative) or its points."""
    half = spacing / 2 if method == "conservative" else 0.0
    return float(coords.min() - half), float(coords.max() + half)


def _check_span(source: str, axis: str, have: tuple[float, float], need: tuple[float, float], unit: str) -> None:
    low_name, high_name = {"lat": ("south", "north"), "lon": ("west", "east")}[axis]
    if have[0] > need[0] + 1e-9:
        raise SourceError(f"source {source!r}: {low_name} edge {need[0]:.4g} {unit} of data.domain is beyond the "
                          f"files' {have[0]:.4g} {unit}; download a larger area (or shrink data.domain)")
    if have[1] < need[1] - 1e-9:
        raise SourceError(f"source {source!r}: {high_name} edge {need[1]:.4g} {unit} of data.domain is beyond the "
                          f"files' {have[1]:.4g} {unit}; download a larger area (or shrink data.domain)")


def axis_weights(source: np.ndarray, target: np.ndarray, method: Regrid, latitude: bool) -> np.ndarray:
    """(n_target, n_source) weights along one axis, from the libraries' own weight functions."""
    if method == "conservative":
        w = get_weights(source, target)  # (n_source, n_target), columns sum to 1
        if latitude:
            w = w * lat_weight(source, _spacing(source))[:, None]
            w = w / np.where(w.sum(axis=0) > 0, w.sum(axis=0), 1.0)
        return w.T
    basis = xr.DataArray(np.eye(source.size), dims=("x", "basis"), coords={"x": source})
    return basis.interp(x=target, method="linear" if method == "bilinear" else "nearest").values


@dataclass(frozen=True)
class Separable:
    """A rectilinear source's rows/columns used (in order) and the two per-axis weight matrices, sparse
    (bilinear and conservative weights have a few non-zeros per row: dense products cost up to 100x more
    at 0.25 degree). A source already on the grid (`regrid: none`) has no weights: it is only reordered."""

    rows: np.ndarray | slice  # a slice (a view, no copy) when the rows are consecutive, as they usually are
    cols: np.ndarray | slice
    w_lat: scipy.sparse.csr_matrix | None  # (H, n_rows)
    w_lon: scipy.sparse.csr_matrix | None  # (W, n_cols)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        """(T, ny, nx) -> (T, H, W) with the sparse weights, one product per axis for all steps."""
        t, ny, nx = x.shape
        y = self.w_lat @ np.moveaxis(x, 1, 0).reshape(ny, t * nx)  # (H, T * nx)
        y = np.moveaxis(y.reshape(-1, t, nx), 1, 0).reshape(-1, nx)  # (T * H, nx)
        return (self.w_lon @ y.T).T.reshape(t, -1, self.w_lon.shape[0])

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """(..., ny, nx) -> (..., H, W); a target cell is missing (NaN) only where a source cell it draws on is
        (a plain product would spread one NaN over whole rows: 0 * NaN = NaN)."""
        x = values[..., self.rows, :][..., self.cols]
        if self.w_lat is None:
            return x.astype(np.float32, copy=False)
        lead = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:]).astype(np.float64)
        finite = np.isfinite(x)
        if finite.all():
            out = self._apply(x)
        else:
            total, weight = self._apply(np.where(finite, x, 0.0)), self._apply(finite.astype(np.float64))
            out = np.where(weight > 1 - 1e-9, total / np.where(weight > 0, weight, 1.0), np.nan)  # rows sum to 1
        return out.reshape(*lead, *out.shape[-2:]).astype(np.float32)


def _select(coords: np.ndarray, lo: float, hi: float, margin: float) -> np.ndarray:
    """Indices of the coordinates within [lo - margin, hi + margin], in ascending coordinate order."""
    chosen = np.flatnonzero((coords >= lo - margin) & (coords <= hi + margin))
    return chosen[np.argsort(coords[chosen], kind="stable")]


def _as_slice(index: np.ndarray) -> np.ndarray | slice:
    """Consecutive indices (either direction) as a slice, so selecting them is a view, not a copy."""
    if index.size > 1 and abs(int(index[1]) - int(index[0])) == 1 and (np.diff(index) == index[1] - index[0]).all():
        step = int(index[1] - index[0])
        stop = int(index[-1]) + step
        return slice(int(index[0]), None if stop < 0 else stop, step)
    return index


def separable(catalog: Catalog, domain: DomainConfig, method: Regrid) -> Separable:
    """Weights from a rectilinear source to the domain; SourceError naming the edge it fails to cover."""
    lat, lon = catalog.lat.astype(np.float64), catalog.lon.astype(np.float64)
    tlat, tlon, res = domain.latitudes(), domain.longitudes(), domain.resolution
    dlat, dlon = _spacing(lat), _spacing(lon)
    base = tlon[0] - res / 2 - 2 * dlon  # longitudes into the target's frame: a seam never splits the domain
    shifted = (lon - base) % 360.0 + base
    margin_lat, margin_lon = 2 * dlat, 2 * dlon
    rows, cols = _select(lat, tlat[0], tlat[-1], margin_lat), _select(shifted, tlon[0], tlon[-1], margin_lon)
    if rows.size == 0 or cols.size == 0:
        raise SourceError(f"source {catalog.source.name!r} does not overlap data.domain at all (files: lat "
                          f"{lat.min():.4g}..{lat.max():.4g}, lon {lon.min():.4g}..{lon.max():.4g}); check the area")
    _check_span(catalog.source.name, "lat", _extent(lat[rows], dlat, method), _needed(tlat[0], tlat[-1], res, method), "N")
    _check_span(catalog.source.name, "lon", _extent(shifted[cols], dlon, method), _needed(tlon[0], tlon[-1], res, method),
                "E")
    if method == "none":  # the grid itself (checked by the caller): reordering only
        return Separable(_as_slice(rows), _as_slice(cols), None, None)
    sparse = lambda w: scipy.sparse.csr_matrix(np.where(np.abs(w) > 1e-12, w, 0.0))  # noqa: E731
    return Separable(_as_slice(rows), _as_slice(cols), sparse(axis_weights(lat[rows], tlat, method, True)),
                     sparse(axis_weights(shifted[cols], tlon, method, False)))


def _check_same_grid(catalog: Catalog, domain: DomainConfig) -> None:
    """`regrid: none` promises a file already on the target grid: say how it differs if it is not."""
    lat, lon = np.sort(catalog.lat.astype(np.float64)), np.sort(catalog.lon.astype(np.float64) % 360.0)
    want_lat, want_lon = domain.latitudes(), np.sort(domain.longitudes() % 360.0)
    tol = 1e-3 * domain.resolution
    if lat.shape != want_lat.shape or lon.shape != want_lon.shape or not (
            np.allclose(lat, want_lat, atol=tol, rtol=0) and np.allclose(lon, want_lon, atol=tol, rtol=0)):
        raise SourceError(f"source {catalog.source.name!r} has regrid: none but its grid ({lat.size}x{lon.size}, lat "
                          f"{lat.min():.4f}..{lat.max():.4f}) is not data.domain's ({domain.n_lat}x{domain.n_lon}, lat "
                          f"{want_lat[0]:.4f}..{want_lat[-1]:.4f}): set a regrid method, or fix data.domain")


@dataclass(frozen=True)
class Curvilinear:
    """A 2-D lat/lon source regridded with pyresample; `__call__` takes (..., ny, nx)."""

    apply: object  # (ny, nx, k) -> (H, W, k), rows north to south (pyresample's area order)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        lead = values.shape[:-2]
        stack = np.moveaxis(values.reshape(-1, *values.shape[-2:]), 0, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # pyresample's bilinear divides 0 by 0 off the grid
            out = np.asarray(self.apply(stack))[::-1]  # rows south to north, as the store
        return np.moveaxis(out, -1, 0).reshape(*lead, *out.shape[:2]).astype(np.float32)


def _bucket_mean(resampler: object, n_target: int, shape: tuple[int, int]):  # noqa: ANN202
    """Average of the source points in each target cell, one sparse product for all layers (pyresample's
    bucket indices; its dask `get_average` took 140 ms per layer, measured)."""
    idxs = np.asarray(resampler.idxs).ravel()
    inside = (idxs >= 0) & (idxs < n_target)
    points = scipy.sparse.csr_matrix((np.ones(inside.sum()), (idxs[inside], np.flatnonzero(inside))),
                                     shape=(n_target, idxs.size))

    def apply(stack: np.ndarray) -> np.ndarray:
        flat = stack.reshape(idxs.size, -1).astype(np.float64)
        finite = np.isfinite(flat)
        count = points @ finite
        total = points @ np.where(finite, flat, 0.0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).reshape(*shape, -1)

    return apply


def curvilinear(catalog: Catalog, domain: DomainConfig, method: Regrid) -> Curvilinear:
    """pyresample regridding of a 2-D lat/lon source onto the domain; SourceError if it does not cover it."""
    with warnings.catch_warnings():  # pyproj's PROJ-string and pyresample's own 0/0 notes, not ours to act on
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return _curvilinear(catalog, domain, method)


def _curvilinear(catalog: Catalog, domain: DomainConfig, method: Regrid) -> Curvilinear:
    from pyresample import bilinear, bucket, geometry, kd_tree

    lat, lon = catalog.lat.astype(np.float64), catalog.lon.astype(np.float64)
    tlat, tlon, res = domain.latitudes(), domain.longitudes(), domain.resolution
    for axis, coords, target, unit in (("lat", lat, tlat, "N"), ("lon", lon, tlon, "E")):
        _check_span(catalog.source.name, axis, (float(coords.min()), float(coords.max())),
                    _needed(target[0], target[-1], res, method), unit)
    area = geometry.AreaDefinition.from_extent("target", "EPSG:4326", (tlat.size, tlon.size),
                                               (tlon[0] - res / 2, tlat[0] - res / 2, tlon[-1] + res / 2, tlat[-1] + res / 2))
    swath = geometry.SwathDefinition(lons=lon, lats=lat)
    spacing = EARTH_RADIUS_M * np.deg2rad(max(_spacing(lat.ravel()), res))
    if method == "conservative":
        import dask.array as da

        resampler = bucket.BucketResampler(area, da.from_array(lon), da.from_array(lat))
        return Curvilinear(_bucket_mean(resampler, tlat.size * tlon.size, (tlat.size, tlon.size)))
    if method == "bilinear":
        resampler = bilinear.NumpyBilinearResampler(swath, area, 2.5 * spacing)
        resampler.get_bil_info()
        return Curvilinear(lambda stack: resampler.get_sample_from_bil_info(stack, fill_value=np.nan))
    info = kd_tree.get_neighbour_info(swath, area, 2.5 * spacing, neighbours=1)
    return Curvilinear(lambda stack: kd_tree.get_sample_from_neighbour_info("nn", area.shape, stack, *info[:3],
                                                                            fill_value=np.nan))


_REGRIDDERS: dict[tuple, Separable | Curvilinear] = {}


def regridder(catalog: Catalog, domain: DomainConfig) -> Separable | Curvilinear:
    """The source's regridder, built once per process (weights and neighbour tables are reused by every block)."""
    method = catalog.source.regrid
    key = (catalog.source.name, catalog.files[0], method, domain.model_dump_json())
    if key not in _REGRIDDERS:
        if catalog.curvilinear:
            if method == "none":
                raise SourceError(f"source {catalog.source.name!r} has a curvilinear (2-D lat/lon) grid: it cannot "
                                  "be used as is (regrid: none); choose bilinear, conservative or nearest")
            _REGRIDDERS[key] = curvilinear(catalog, domain, method)
        else:
            if method == "none":
                _check_same_grid(catalog, domain)
            _REGRIDDERS[key] = separable(catalog, domain, method)
    return _REGRIDDERS[key]
