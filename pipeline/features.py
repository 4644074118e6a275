"""The feature graph, declared once as a table of outputs (xarray-beam style).

Each `Output` names a store array, its dims, dtype and CF attrs, and the small pure function that
computes it: per time block (`TIME_OUTPUTS`, from a `Block` of dynamic fields), once (`STATIC_OUTPUTS`,
from the `Statics`), or at the build's finalise step (`FINAL_OUTPUTS`, statistics). The store's
schema (`pipeline.store`), the build's block task (`pipeline.build`) and the shard writer
(`pipeline.shard`: the `member` of an output is its name inside a sample or beside the manifest)
all read these tables, so adding an output is one row here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.records import StoreRecord
from pipeline.scan import mean_wind, orders_from_sectors, patch_mean, patch_std, region_wind_sums, snap_sector

ORDER = "order"  # placeholder dtype: the layout's scan-order dtype (int16, or int32 beyond 32767 tokens)


@dataclass
class Block:
    """One time block of the store: dynamic fields (t, V, H, W) float32 (latitude ascending), which
    steps are valid, and the record. `output(name)` computes a TIME_OUTPUTS row once per block."""

    record: StoreRecord
    fields: np.ndarray
    valid: np.ndarray
    _done: dict[str, np.ndarray] = field(default_factory=dict)

    def output(self, name: str) -> np.ndarray:
        if name not in self._done:
            self._done[name] = TIME_TABLE[name].compute(self)
        return self._done[name]

    @functools.cached_property
    def wind(self) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) with missing steps as calm (0 m/s), so they get raster order and never NaN sectors."""
        dynamic = self.record.names("dynamic")
        u, v = (self.fields[:, dynamic.index(n)] for n in self.record.wind)
        if self.valid.all():
            return u, v
        return np.where(self.valid[:, None, None], u, 0.0), np.where(self.valid[:, None, None], v, 0.0)

    @functools.cached_property
    def wind_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`region_wind_sums` of the block's regions, (t, RY, RX) each: both scans' sectors come from them."""
        grid, regions = self.record.layout.grid, self.record.layout.regions
        return region_wind_sums(*self.wind, (grid[0] // regions[0], grid[1] // regions[1]))


@dataclass(frozen=True)
class Statics:
    """The static inputs of a store: static channels (S, H, W), barrier elevation and loss mask."""

    record: StoreRecord
    static: np.ndarray
    elevation: np.ndarray
    loss_mask: np.ndarray


@dataclass(frozen=True)
class Output:
    """One store array: where it lives (dims), what it is (dtype, CF attrs), how it is computed."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    attrs: dict[str, str]
    compute: Callable[..., np.ndarray] | None = None  # Block -> array, Statics -> array, or None (finalise)
    member: str | None = None  # its file in a shard sample / beside the manifest
    chunks: tuple[tuple[str, int], ...] = ()  # dims chunked smaller than whole (time: build.time_chunk)

    def dtype_for(self, record: StoreRecord) -> np.dtype:
        return record.layout.order_dtype if self.dtype == ORDER else np.dtype(self.dtype)


def _sectors(block: Block, whole_domain: bool) -> np.ndarray:
    """(t, RY*RX) snapped wind sectors of a block's regions, or (t, 1) of the whole domain (-1 calm),
    DESIGN.md's exact rule; the domain's mean adds up the regions' sums."""
    sums = block.wind_sums
    if whole_domain:
        sums = tuple(s.sum(axis=(-2, -1), keepdims=True) for s in sums)
    sector = snap_sector(*mean_wind(*sums), block.record.sectors, block.record.calm_threshold)
    return sector.reshape(len(block.valid), -1)


def _orders(block: Block, sectors: np.ndarray, regions: tuple[int, int]) -> np.ndarray:
    layout = block.record.layout
    return orders_from_sectors(sectors, layout.patch_grid, regions, block.record.sectors)


def _patch_speed(block: Block) -> np.ndarray:
    u, v = block.wind
    # float32 accumulation: a mean of patch_size**2 speeds loses nothing float64 would keep (3x faster);
    # sqrt(u*u + v*v) rather than hypot: 5x faster, and wind components never come near float32 overflow
    speed = patch_mean(np.sqrt(u * u + v * v), block.record.layout.patch_size, np.float32)
    speed[~block.valid] = np.nan
    return speed


TIME_OUTPUTS = (
    # one chunk per variable and block: with zarr 3.1, a 24 x 128 x 256 float32 block of 11 variables
    # wrote 2.7x and read 4-5x faster as 11 chunks than as one (measured side by side, same codec)
    Output("fields", ("time", "var", "lat", "lon"), "float32",
           {"long_name": "dynamic input variables, physical units (see var_units)"},
           lambda b: b.fields, "input.npy", chunks=(("var", 1),)),
    Output("valid", ("time",), "bool",
           {"long_name": "the time step exists in every source (False: a gap, fields are NaN)"},
           lambda b: b.valid),
    Output("wind_speed", ("time", "token"), "float32",
           {"units": "m s-1", "long_name": "mean wind speed per patch"}, _patch_speed, "wind_speed.npy"),
    Output("region_sector", ("time", "region"), "int8",
           {"long_name": "snapped wind sector per region, -1 calm"},
           lambda b: _sectors(b, whole_domain=False)),
    Output("global_sector", ("time",), "int8",
           {"long_name": "snapped domain-mean wind sector, -1 calm"}, lambda b: _sectors(b, whole_domain=True)[:, 0]),
    Output("scan_order", ("time", "token"), ORDER,
           {"long_name": "sequence position -> spatial token (regional scan)"},
           lambda b: _orders(b, b.output("region_sector"), b.record.layout.regions), "scan_order.npy"),
    Output("scan_order_global", ("time", "token"), ORDER,
           {"long_name": "sequence position -> spatial token (global scan)"},
           lambda b: _orders(b, b.output("global_sector")[:, None], (1, 1)), "scan_order_global.npy"),
)

STATIC_OUTPUTS = (
    Output("static", ("static_var", "lat", "lon"), "float32",
           {"long_name": "static input variables, physical units (see static_units)"}, lambda s: s.static,
           "static.npy"),
    Output("elevation", ("lat", "lon"), "float32", {"units": "m", "standard_name": "surface_altitude"},
           lambda s: s.elevation),
    Output("loss_mask", ("lat", "lon"), "bool", {"long_name": "cells counted in loss and metrics"},
           lambda s: s.loss_mask, "loss_mask.npy"),
    Output("patch_elevation", ("token",), "float32", {"units": "m", "long_name": "mean elevation per patch"},
           lambda s: patch_mean(s.elevation, s.record.layout.patch_size).astype(np.float32), "patch_elevation.npy"),
    Output("patch_elevation_std", ("token",), "float32", {"units": "m", "long_name": "elevation std per patch"},
           lambda s: patch_std(s.elevation, s.record.layout.patch_size).astype(np.float32)),
)

FINAL_OUTPUTS = (
    Output("stats_mean", ("var",), "float64", {"long_name": "train-period mean (valid steps)"}),
    Output("stats_std", ("var",), "float64", {"long_name": "train-period population std (valid steps)"}),
    Output("static_mean", ("static_var",), "float64", {"long_name": "grid mean of each static variable"}),
    Output("static_std", ("static_var",), "float64", {"long_name": "grid population std of each static variable"}),
)

TIME_TABLE = {o.name: o for o in TIME_OUTPUTS}
OUTPUTS = {o.name: o for o in (*TIME_OUTPUTS, *STATIC_OUTPUTS, *FINAL_OUTPUTS)}

# coordinate input channels: derived from the store's lat/lon coordinates, never stored (DESIGN.md)
COORDINATE_LAYERS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "lat2d": lambda lat, lon: np.broadcast_to(lat[:, None], (lat.size, lon.size)),
    "lon2d": lambda lat, lon: np.broadcast_to(lon[None, :], (lat.size, lon.size)),
}
