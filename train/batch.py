"""`Batch` and its assembly from samples (`pipeline.codec.Sample`): normalisation, lead selection and loss masks.

Assembly runs inside the loader workers, so the training loop receives ready tensors. `x` holds the
dynamic channels only (the static and coordinate channels join on the device: `train.inputs`).
Targets are normalised with the manifest's statistics of the target variables; `mask` is True where
the target is finite AND the static loss mask counts the cell, and `y` is 0 wherever `mask` is
False, so a masked loss never touches a NaN (0 * NaN would still be NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from pipeline.codec import Sample
from topoflow.layout import ScanMode
from train.shards import ShardSet


@dataclass
class Batch:
    """One batch. x (B, V_dynamic, H, W) normalised. Train mode: y/mask (B,P,H,W), lead_times (B,);
    eval mode: y/mask (B,n_leads,P,H,W), lead_times (n_leads,). `valid` (B,) is False for eval
    padding rows (their mask is all False)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    lead_times: torch.Tensor
    scan_order: torch.Tensor
    scan_order_global: torch.Tensor
    wind_speed: torch.Tensor
    valid: torch.Tensor
    keys: list[str]
    times: list[str]
    skipped_shards: list[str]

    def _map(self, fn: Any) -> "Batch":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> "Batch":
        """Wrap `assemble`'s numpy arrays as tensors without copying."""
        return cls(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def order_for(self, scan: ScanMode) -> torch.Tensor | None:
        """The (B, L) scan order for a model's `scan` setting; None means identity (spatial order)."""
        if scan == "regional":
            return self.scan_order
        if scan == "global":
            return self.scan_order_global
        if scan == "none":
            return None
        raise ValueError(f"unknown scan {scan!r}: use 'regional', 'global' or 'none'")


def _normalise(a: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(a - mean) / std in place, for float32 `a` and float64 stats, at float64-like accuracy.

    The mean is split into float32 hi + lo parts: a - hi loses (almost) nothing and lo restores the
    rest. A plain float32 mean of ~1e5 Pa pressure alone costs 1e-5 after scaling; converting the
    batch to float64 instead made assembly 14x slower.
    """
    hi = mean.astype(np.float32)
    a -= hi
    a -= (mean - hi).astype(np.float32)
    a *= (1.0 / std).astype(np.float32)
    return a


def draw_leads(samples: list[Sample], shards: ShardSet, rng: np.random.Generator, size: int) -> np.ndarray:
    """One lead index per sample, uniform over the leads, redrawn among those with a target to learn from.

    A sample near the end of its split has no target at its longer leads (they lie past the split);
    drawn there it only adds a fully masked row, and a batch of such rows has no loss at all, which
    stops training. The first draw is kept wherever it has a target, so other samples draw as before.
    """
    leads = rng.integers(len(shards.leads_h), size=size)
    for i, s in enumerate(samples):
        def learnable(lead: int) -> bool:
            target = s.targets[lead]  # noqa: B023
            return target is not None and target.learnable(shards.loss_mask)

        if learnable(leads[i]):
            continue
        usable = [lead for lead in range(len(shards.leads_h)) if learnable(lead)]
        if usable:
            leads[i] = rng.choice(usable)
    return leads


def assemble(samples: list[Sample | None], shards: ShardSet, lead_index: np.ndarray | None,
             skipped_shards: list[str]) -> dict[str, Any]:
    """Samples (None = eval padding) -> the fields of a Batch as numpy arrays (`Batch.from_arrays`).
    `lead_index` (B,) picks one lead per sample (train); None keeps all leads (eval). A lead without a
    target (past the split) stays NaN, so its mask is False.

    Numpy, not tensors, because loader workers pass batches to the main process: pickled arrays
    travel in one message, while each tensor costs torch a shared-memory segment and a file
    descriptor (benchmarks/loader.py)."""
    v, (h, w) = shards.frame_format.shapes["input.npy"][0], shards.layout.grid
    n_leads, p, n_tok = len(shards.leads_h), len(shards.targets), shards.layout.n_tokens
    b = len(samples)
    valid = np.array([s is not None for s in samples])
    x = np.empty((b, v, h, w), dtype=np.float32)  # padding rows are zeroed after normalising
    train = lead_index is not None
    target = np.full((b, p, h, w) if train else (b, n_leads, p, h, w), np.nan, dtype=np.float32)
    order = np.broadcast_to(np.arange(n_tok, dtype=np.int64), (b, n_tok)).copy()
    order_global, wind = order.copy(), np.zeros((b, n_tok), dtype=np.float32)
    keys, times = [""] * b, [""] * b
    for i, s in enumerate(samples):
        if s is None:
            continue
        x[i] = s.input
        for lead, out in ([(lead_index[i], target[i])] if train else enumerate(target[i])):  # only the drawn lead
            if s.targets[lead] is not None:
                s.targets[lead].copy_to(out)
        order[i], order_global[i], wind[i] = s.scan_order, s.scan_order_global, s.wind_speed
        keys[i], times[i] = s.key, s.time
    x = _normalise(x, shards.stats_mean[:, None, None], shards.input_std[:, None, None])
    x[~valid] = 0.0
    leads = np.asarray(shards.leads_h, dtype=np.float32)
    lead_times = leads[lead_index] if train else leads
    tidx = shards.target_index
    tm, ts = shards.stats_mean[tidx, None, None], shards.input_std[tidx, None, None]  # broadcast over (.., P, H, W)
    mask = np.isfinite(target) & shards.loss_mask
    y = _normalise(target, tm, ts)
    y[~mask] = 0.0
    return {"x": x, "y": y, "mask": mask, "lead_times": lead_times, "scan_order": order,
            "scan_order_global": order_global, "wind_speed": wind, "valid": valid, "keys": keys, "times": times,
            "skipped_shards": list(skipped_shards)}
