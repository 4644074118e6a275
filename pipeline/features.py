"""The lazy Dask graph from a validated source to every array of features.zarr.

Time-dependent arrays are dask arrays chunked exactly like the store (one chunk = one resumable
block), built with `map_blocks` over those chunks, so the same code runs on a laptop and a SLURM
cluster and there is no Python loop over time. Small static arrays are computed eagerly in numpy.
Train statistics come as per-block moments (count, mean, M2 in float64, NaN-aware) merged at the
end, so a resumed build never rereads finished blocks.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from pipeline.config import PipelineConfig
from pipeline.scan import orders_from_sectors, order_dtype, patch_mean, patch_std, region_mean_wind, snap_sector
from pipeline.source import ELEVATION, LOSS_MASK, check_finite

N_MOMENTS = 3  # count, mean, M2 per variable


def _time_layer(values: np.ndarray, n_time: int, time_chunks: tuple[int, ...]) -> da.Array:
    """A static (lat, lon) field broadcast over time with the store's time chunks (no copy in the graph)."""
    h, w = values.shape
    return da.broadcast_to(da.from_array(values.astype(np.float32)), (n_time, h, w), chunks=(time_chunks, h, w))


def _stack_vars(*layers: np.ndarray) -> np.ndarray:
    """(t, H, W) layers -> one contiguous (t, V, H, W) block (np.stack: a single copy, unlike a rechunk)."""
    return np.stack(layers, axis=1)


def _patch_speed(u: np.ndarray, v: np.ndarray, patch_size: int) -> np.ndarray:
    return patch_mean(np.hypot(u, v, dtype=np.float32), patch_size).astype(np.float32)


def _sectors(u: np.ndarray, v: np.ndarray, regions: tuple[int, int], sectors: int, calm: float) -> np.ndarray:
    """(t, H, W) winds -> (t, RY*RX) snapped sectors (-1 calm)."""
    t, h, w = u.shape
    ry, rx = regions
    um, vm = region_mean_wind(u, v, (h // ry, w // rx))
    return snap_sector(um, vm, sectors, calm).reshape(t, ry * rx)


def _sum_sq(d: np.ndarray) -> float:
    """Sum of squares without a squared temporary (einsum is ~3x faster than np.square(d).sum())."""
    return float(np.einsum("ij,ij->", d, d))


def block_moments(x: np.ndarray) -> np.ndarray:
    """(t, V, H, W) -> (1, V, 3) [count, mean, M2] per variable in float64, ignoring NaN/inf."""
    flat = x.reshape(*x.shape[:2], int(np.prod(x.shape[2:])))
    total = flat.sum(axis=(0, 2), dtype=np.float64)
    if np.isfinite(total).all():  # the usual case: float64 accumulation straight from float32, no masks
        count = np.full(x.shape[1], flat.shape[0] * flat.shape[2], dtype=np.float64)
        mean = total / np.maximum(count, 1)
        m2 = np.array([_sum_sq(flat[:, i].astype(np.float64) - mean[i]) for i in range(x.shape[1])])
    else:
        flat = np.where(np.isfinite(flat), flat.astype(np.float64), np.nan)
        count = np.isfinite(flat).sum(axis=(0, 2)).astype(np.float64)
        mean = np.divide(np.nansum(flat, axis=(0, 2)), count, out=np.zeros_like(count), where=count > 0)
        m2 = np.nansum((flat - mean[None, :, None]) ** 2, axis=(0, 2))
    return np.stack([count, mean, m2], axis=-1)[None]


def _train_moments(fields: np.ndarray, times: np.ndarray, start: np.int64, end: np.int64, names: list[str]) -> np.ndarray:
    """One block's moments over its train times; NaN/inf anywhere in the block is a source error."""
    times = times.reshape(-1)
    check_finite(fields, names, times.astype("datetime64[ns]"))
    first, stop = np.searchsorted(times, start, side="left"), np.searchsorted(times, end, side="right")
    return block_moments(fields[first:stop])  # times are sorted: the train steps are one slice, no copy


def merge_moments(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, V, 3) per-block [count, mean, M2] -> pooled float64 mean and population std per variable.

    Exact pooled formula (Chan et al. 1979): M2 = sum(M2_b + n_b (mean_b - mean)^2).
    """
    n, m, m2 = np.moveaxis(moments.astype(np.float64), -1, 0)
    total = n.sum(axis=0)
    mean = (n * m).sum(axis=0) / total
    pooled = (m2 + n * (m - mean) ** 2).sum(axis=0)
    return mean, np.sqrt(pooled / total)


def feature_dataset(src: xr.Dataset, cfg: PipelineConfig) -> tuple[xr.Dataset, da.Array]:
    """(lazy store dataset without stats, lazy per-block moments (blocks, V, 3)) for a validated source."""
    data = cfg.data
    p, (ry, rx) = data.patch_size, data.regions
    gh, gw = data.patch_grid
    n_tok, n_reg = gh * gw, ry * rx
    lat, lon = src["lat"].values.astype(np.float64), src["lon"].values.astype(np.float64)
    n_time = src.sizes["time"]
    tchunks = src[data.wind[0]].chunks[0]
    lat2d, lon2d = np.meshgrid(lat, lon, indexing="ij")

    layers = []
    for spec in data.variables:
        if spec.kind == "dynamic":
            layers.append(src[spec.name].data.astype(np.float32).rechunk((tchunks, -1, -1)))
        elif spec.kind == "static":
            layers.append(_time_layer(src[spec.name].values, n_time, tchunks))
        else:
            layers.append(_time_layer(lat2d if spec.name == "lat2d" else lon2d, n_time, tchunks))
    h, w = lat.size, lon.size
    fields = da.map_blocks(_stack_vars, *layers, new_axis=1, chunks=(tchunks, (len(layers),), (h,), (w,)), dtype=np.float32)

    u, v = (src[name].data.astype(np.float32).rechunk((tchunks, -1, -1)) for name in data.wind)
    speed = da.map_blocks(_patch_speed, u, v, p, drop_axis=2, chunks=(tchunks, (n_tok,)), dtype=np.float32)
    odt = order_dtype(n_tok)
    sector_args = (data.sectors, data.calm_threshold)
    reg_sector = da.map_blocks(_sectors, u, v, (ry, rx), *sector_args, drop_axis=2, chunks=(tchunks, (n_reg,)), dtype=np.int8)
    glob_sector = da.map_blocks(_sectors, u, v, (1, 1), *sector_args, drop_axis=2, chunks=(tchunks, (1,)), dtype=np.int8)
    reg_order = reg_sector.map_blocks(orders_from_sectors, (gh, gw), (ry, rx), data.sectors, chunks=(tchunks, (n_tok,)), dtype=odt)
    glob_order = glob_sector.map_blocks(orders_from_sectors, (gh, gw), (1, 1), data.sectors, chunks=(tchunks, (n_tok,)), dtype=odt)

    times = src["time"].values.astype("datetime64[ns]")
    train = data.splits["train"]
    t_int = da.from_array(times.view(np.int64).reshape(-1, 1, 1, 1), chunks=(tchunks, 1, 1, 1))
    bounds = [np.datetime64(pd.Timestamp(x), "ns").view(np.int64) for x in (train.start, train.end)]
    moments = da.map_blocks(
        _train_moments, fields, t_int, *bounds, data.variable_names,
        drop_axis=3, chunks=((1,) * len(tchunks), (len(data.variables),), (N_MOMENTS,)), dtype=np.float64,
    )

    elevation = src[ELEVATION].values.astype(np.float32)
    mask = src[LOSS_MASK].values >= 0.5 if LOSS_MASK in src else np.ones(elevation.shape, dtype=bool)
    units = {v.name: v.units for v in data.variables}
    ds = xr.Dataset(
        {
            "fields": (("time", "var", "lat", "lon"), fields, {"long_name": "input variables, physical units (see root attr units)"}),
            "elevation": (("lat", "lon"), elevation, {"units": "m", "standard_name": "surface_altitude"}),
            "loss_mask": (("lat", "lon"), mask, {"long_name": "cells counted in loss and metrics"}),
            "patch_elevation": (("token",), patch_mean(elevation, p).astype(np.float32), {"units": "m", "long_name": "mean elevation per patch"}),
            "patch_elevation_std": (("token",), patch_std(elevation, p).astype(np.float32), {"units": "m", "long_name": "elevation std per patch"}),
            "wind_speed": (("time", "token"), speed, {"units": "m s-1", "long_name": "mean wind speed per patch"}),
            "region_sector": (("time", "region"), reg_sector, {"long_name": "snapped wind sector per region, -1 calm"}),
            "global_sector": (("time",), glob_sector[:, 0], {"long_name": "snapped domain-mean wind sector, -1 calm"}),
            "scan_order": (("time", "token"), reg_order, {"long_name": "sequence position -> spatial token (regional scan)"}),
            "scan_order_global": (("time", "token"), glob_order, {"long_name": "sequence position -> spatial token (global scan)"}),
            "stats_mean": (("var",), da.zeros(len(units), dtype=np.float64), {"long_name": "train-period mean"}),
            "stats_std": (("var",), da.zeros(len(units), dtype=np.float64), {"long_name": "train-period population std"}),
        },
        coords={
            "time": ("time", times),
            "var": ("var", np.array(data.variable_names, dtype=object), {"units": [units[n] for n in data.variable_names]}),
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude", "axis": "X"}),
            "token": ("token", np.arange(n_tok), {"long_name": "patch_row * patch_cols + patch_col, rows from south"}),
            "region": ("region", np.arange(n_reg), {"long_name": "region_row * region_cols + region_col"}),
        },
    )
    return ds, moments
