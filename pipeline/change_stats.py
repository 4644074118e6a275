"""Spread of each target's change over each lead time, on the training period (for residual forecasts).

Why: a residual model predicts y(t + lead) - y(t). Near the surface that change is large at 12 h
(day and night swap) and small at 24 h (same time of day), so one normalisation for all leads lets
the 12 h changes dominate the loss and the network's 12 h habits leak into 24 h. Normalising the
change by its own per-lead standard deviation puts every lead on the same footing (GraphCast, Lam et
al. 2023, normalises its residual targets by the std of time differences in the same way).

The std is estimated from at most `max_inputs` input times (both t and t + lead inside the train
split), float64 and NaN-aware. A long split is sampled in evenly spread runs of consecutive steps, one
store chunk long, so the read touches a few dozen chunks instead of one chunk per scattered time step.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import xarray as xr

MAX_INPUTS = 500


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
    train split. A lead with no pair inside the split gets NaN (the loader then falls back to the
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
        stds.append(da.nanstd((end - start).astype(np.float64), axis=(0, 2, 3)))
    (result,) = dask.compute(da.stack(stds))
    return np.asarray(result, dtype=np.float64), pairs
