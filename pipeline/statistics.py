"""Normalisation statistics and tendencies, in one place (as anemoi-datasets keeps them).

- Per-variable mean/std over the train period: each build task returns its block's moments
  (count, mean, M2 in float64, NaN-aware), merged exactly at the end (Chan et al. 1979), so a resumed
  build never rereads finished blocks.
- Per-lead spread of each target's change (the "tendencies"): why it exists: a residual model predicts
  y(t + lead) - y(t). Near the surface that change is large at 12 h (day and night swap) and small at
  24 h (same time of day), so one normalisation for all leads lets the 12 h changes dominate the
  loss. Normalising each lead's change by its own std puts every lead on the same footing (GraphCast,
  Lam et al. 2023, normalises its residual targets by the std of time differences likewise). It is
  estimated at the build's finalise step from at most `MAX_INPUTS` train input times, sampled in
  evenly spread runs of consecutive steps one store chunk long (a few dozen chunk reads).
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import xarray as xr

N_MOMENTS = 3  # count, mean, M2 per variable
MAX_INPUTS = 500


def _sum_sq(d: np.ndarray) -> float:
    """Sum of squares without a squared temporary (einsum is ~3x faster than np.square(d).sum())."""
    return float(np.einsum("ij,ij->", d, d))


def block_moments(x: np.ndarray) -> np.ndarray:
    """(t, V, H, W) -> (V, 3) [count, mean, M2] per variable in float64, ignoring NaN/inf."""
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
    return np.stack([count, mean, m2], axis=-1)


def merge_moments(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, V, 3) per-block [count, mean, M2] -> pooled float64 mean and population std per variable.

    Exact pooled formula (Chan et al. 1979): M2 = sum(M2_b + n_b (mean_b - mean)^2).
    """
    n, m, m2 = np.moveaxis(moments.astype(np.float64), -1, 0)
    total = n.sum(axis=0)
    mean = (n * m).sum(axis=0) / total
    pooled = (m2 + n * (m - mean) ** 2).sum(axis=0)
    return mean, np.sqrt(pooled / total)


def grid_moments(layers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, H, W) static layers -> float64 mean and population std per layer over the grid."""
    flat = layers.reshape(len(layers), -1).astype(np.float64)
    return flat.mean(axis=1), flat.std(axis=1)


def _sampled_inputs(n: int, chunk: int, max_inputs: int) -> np.ndarray:
    """Split positions to use: all of them, or evenly spread runs of up to `chunk` consecutive steps."""
    if n <= max_inputs:
        return np.arange(n)
    run = min(chunk, max_inputs)
    starts = np.linspace(0, n - run, max(1, max_inputs // run)).round().astype(int)
    return np.unique((starts[:, None] + np.arange(run)[None]).ravel())


def change_std(fields: xr.DataArray, train: np.ndarray, target_vars: list[int], leads_h: list[int],
               max_inputs: int = MAX_INPUTS) -> tuple[np.ndarray, list[int]]:
    """(n_leads, P) population std of fields[t + lead] - fields[t] per target, and the pairs per lead.

    `fields` is the store's (time, var, lat, lon) array, `train` the sorted store indices of the
    valid train steps. A lead with no pair inside them gets NaN (the trainer then falls back to the
    target's own std and says so).
    """
    times = fields["time"].values[train]
    inputs = _sampled_inputs(len(train), fields.data.chunks[0][0], max_inputs)
    stds, pairs = [], []
    for lead in leads_h:
        later = times[inputs] + np.timedelta64(lead, "h")
        pos = np.minimum(np.searchsorted(times, later), len(times) - 1)
        found = times[pos] == later
        pairs.append(int(found.sum()))
        if not found.any():
            stds.append(da.full(len(target_vars), np.nan))
            continue
        start = fields.data[train[inputs[found]]][:, target_vars]
        end = fields.data[train[pos[found]]][:, target_vars]
        stds.append(da.nanstd(end.astype(np.float64) - start.astype(np.float64), axis=(0, 2, 3)))
    (result,) = dask.compute(da.stack(stds))
    return np.asarray(result, dtype=np.float64), pairs
