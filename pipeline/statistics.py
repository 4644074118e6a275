"""Normalisation statistics and tendencies, in one place (as anemoi-datasets keeps them).

- Per-variable mean/std over the train period: each build task returns its block's moments
  (count, mean, M2 in float64, NaN-aware), merged exactly at the end (Chan et al. 1979), so a resumed
  build never rereads finished blocks.
- Per-lead spread of each target's change (the "tendencies"): why it exists: a residual model predicts
  y(t + lead) - y(t). Near the surface that change is large at 12 h (day and night swap) and small at
  24 h (same time of day), so one normalisation for all leads lets the 12 h changes dominate the
  loss. Normalising each lead's change by its own std puts every lead on the same footing (GraphCast,
  Lam et al. 2023, normalises its residual targets by the std of time differences likewise). A
  `ChangePlan` names the frames it needs; the block tasks save them while the block is in memory
  (anemoi computes its tendency statistics in a second pass over the dataset; measured here, re-reading
  the store cost more than the rest of finalise, benchmarks/pipeline.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

N_MOMENTS = 3  # count, mean, M2 per variable
MAX_INPUTS = 128  # input steps behind the change spread (frames <= 5 x 128 x 6 targets x 2048 cells: 31 MB)
MAX_CELLS = 2048  # cells per saved target frame (the reference 128x256 grid: every 4th cell, 1 degree apart)


SLAB_CELLS = 1 << 17  # float64 cells per pass of layer_moments (1 MiB): a slab is centred and squared in cache


def layer_moments(x: np.ndarray) -> np.ndarray:
    """(t, V, H, W) -> (t, V, 3) [count, mean, M2] of each layer in float64, ignoring NaN/inf.

    One pass over x: each slab of layers is converted to float64 once, then summed, centred and squared
    while it sits in the CPU cache (6.8 ms against 9.0 ms for a sum pass plus a squared-deviation pass
    per variable, measured at 24 x 11 x 128 x 256). A layer's count is H*W exactly when every cell is
    finite, so the build's finite check needs no pass of its own.
    """
    t, v = x.shape[:2]
    flat = x.reshape(t * v, -1)
    n = flat.shape[1]
    out = np.empty((t * v, 3))
    out[:, 0] = n
    rows = max(1, SLAB_CELLS // max(n, 1))
    for r in range(0, t * v, rows):
        slab = flat[r:r + rows].astype(np.float64)
        mean = slab.sum(axis=1) / max(n, 1)
        slab -= mean[:, None]
        out[r:r + rows, 1], out[r:r + rows, 2] = mean, np.einsum("ij,ij->i", slab, slab)
    for r in np.flatnonzero(~np.isfinite(out[:, 1:]).all(axis=1)):  # missing cells: moments of those present
        kept = flat[r][np.isfinite(flat[r])].astype(np.float64)
        mean = kept.mean() if len(kept) else 0.0
        out[r] = len(kept), mean, np.square(kept - mean).sum()
    return out.reshape(t, v, 3)


def pool_moments(moments: np.ndarray) -> np.ndarray:
    """(k, V, 3) [count, mean, M2] of k parts -> (V, 3) of their union, exactly (Chan et al. 1979):
    M2 = sum(M2_k + n_k (mean_k - mean)^2). A variable with no values pools to [0, 0, 0]."""
    n, mean, m2 = np.moveaxis(np.asarray(moments, np.float64), -1, 0)
    total = n.sum(axis=0)
    pooled = np.divide((n * mean).sum(axis=0), total, out=np.zeros_like(total), where=total > 0)
    return np.stack([total, pooled, (m2 + n * (mean - pooled) ** 2).sum(axis=0)], axis=-1)


def block_moments(x: np.ndarray) -> np.ndarray:
    """(t, V, H, W) -> (V, 3) [count, mean, M2] per variable in float64, ignoring NaN/inf."""
    return pool_moments(layer_moments(x))


def merge_moments(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, V, 3) per-block [count, mean, M2] -> pooled float64 mean and population std per variable
    (NaN for a variable with no values at all)."""
    total, mean, m2 = np.moveaxis(pool_moments(moments), -1, 0)
    empty = total == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(empty, np.nan, mean), np.sqrt(m2 / total)


def grid_moments(layers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, H, W) static layers -> float64 mean and population std per layer over the grid."""
    flat = layers.reshape(len(layers), int(np.prod(layers.shape[1:]))).astype(np.float64)
    return flat.mean(axis=1), flat.std(axis=1)


@dataclass(frozen=True)
class ChangePlan:
    """Which target frames the change spread needs, at which spatial stride, stored how.

    At most `MAX_INPUTS` input steps, evenly spread over the usable (valid, train) steps, and every
    usable target step t + lead of them. The build's block tasks save these frames (target variables
    only, every `stride`-th cell so a frame keeps at most `MAX_CELLS` cells) while the block is in
    memory, each block into its own chunk of a (blocks, slots, P, h, w) array (one file per block:
    one file per frame cost 40 ms a block, measured), so finalise reads a few MB instead of the store.
    With few enough steps and cells (the demo, the tests) the estimate is exact.
    """

    inputs: np.ndarray  # store indices of the sampled input steps
    frames: np.ndarray  # sorted store indices of every frame needed (inputs and usable lead targets)
    lead_steps: tuple[int, ...]
    stride: int
    block: int  # time steps per build block

    @classmethod
    def create(cls, usable: np.ndarray, lead_steps: list[int], grid: tuple[int, int], block: int,
               max_inputs: int = MAX_INPUTS, max_cells: int = MAX_CELLS) -> "ChangePlan":
        candidates = np.flatnonzero(usable)
        picks = np.linspace(0, len(candidates) - 1, min(max_inputs, len(candidates))).round().astype(int)
        inputs = np.unique(candidates[picks])
        later = (inputs[:, None] + np.asarray(lead_steps, dtype=int)[None]).ravel()
        later = later[later < len(usable)]
        stride = max(1, math.ceil(math.sqrt(grid[0] * grid[1] / max_cells)))
        return cls(inputs, np.union1d(inputs, later[usable[later]]), tuple(lead_steps), stride, block)

    @property
    def per_block(self) -> np.ndarray:
        """Frames in each build block."""
        return np.bincount(self.frames // self.block, minlength=int(self.frames.max(initial=0)) // self.block + 1)

    def storage(self, n_blocks: int, n_targets: int, grid: tuple[int, int]) -> tuple[int, ...]:
        """Shape of the stored frames, (blocks, slots, P, h, w); a chunk is one block."""
        slots = max(1, int(self.per_block.max(initial=0)))
        return n_blocks, slots, n_targets, -(-grid[0] // self.stride), -(-grid[1] // self.stride)

    def block_frames(self, start: int, stop: int) -> np.ndarray:
        """Store indices of the frames inside the time block [start, stop), in slot order."""
        return self.frames[(self.frames >= start) & (self.frames < stop)]

    def thin(self, targets: np.ndarray) -> np.ndarray:
        """(..., H, W) -> every stride-th cell, as the frames keep them."""
        return targets[..., ::self.stride, ::self.stride]

    def gather(self, stored: np.ndarray) -> np.ndarray:
        """(blocks, slots, ...) as written by the blocks -> (frames, ...) in the order of `frames`."""
        return np.concatenate([stored[b, :n] for b, n in enumerate(self.per_block)]) if len(self.frames) else \
            stored[:0, 0]

    def spread(self, frames: Any) -> tuple[np.ndarray, list[int]]:
        """(n_leads, P) population std of target changes per lead, and the pairs behind each (NaN: none)."""
        stds, pairs = [], []
        for k in self.lead_steps:
            ok = np.isin(self.inputs + k, self.frames)
            start, end = np.searchsorted(self.frames, self.inputs[ok]), np.searchsorted(self.frames, self.inputs[ok] + k)
            moments = [block_moments(np.asarray(frames[end[i:i + 64]], np.float64) - frames[start[i:i + 64]])
                       for i in range(0, len(start), 64)]
            stds.append(merge_moments(np.stack(moments))[1] if moments else np.full(frames.shape[1], np.nan))
            pairs.append(int(ok.sum()))
        return np.stack(stds), pairs
