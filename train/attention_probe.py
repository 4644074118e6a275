"""Diagnostic: the share of physics-block attention that crosses more than 1,000 m uphill.

The uphill barrier exists to stop air (information) flowing from a low key to a high query, so its
effect is visible as attention mass on (query, key) pairs where z_query - z_key > 1,000 m (per-patch
mean elevation). A hook on the physics block's attention recomputes q, k from the block's input and
sums that mass with the bias (as the model runs; physics on) and without it (same q, k; what the bias
changed), beside the share of such pairs (what uniform attention would give). A model without physics
is probed at the block the physics would sit in (`physics.blocks[0]`), without bias only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.net import TopoFlowClimaX, to_sequence
from model.physics import TokenFields
from train.batch import Batch

UPHILL_M = 1000.0
PROBE_BATCHES = 2
_SUMS = ("with_bias", "without_bias", "uphill_pairs", "pairs", "rows")


def uphill_mass(probs: Tensor, z_query: Tensor, z_key: Tensor, threshold_m: float = UPHILL_M) -> Tensor:
    """Attention mass of probs (B, H, Q, K) on pairs whose key->query climb z_query - z_key (z_*: (B, Q), (B, K),
    metres) exceeds `threshold_m`; divided by B * H * Q it is the uphill share (rows sum to 1)."""
    climbs = (z_query[:, :, None] - z_key[:, None, :]) > threshold_m
    return (probs * climbs[:, None].to(probs.dtype)).sum()


class UphillProbe:
    """Sums of uphill attention mass over the first PROBE_BATCHES batches of an evaluation (lead 0)."""

    def __init__(self, net: TopoFlowClimaX, patch_elevation: np.ndarray, scan: Any, chunk: int = 256) -> None:
        self.block = min(net.cfg.physics.blocks[0], len(net.blocks) - 1)  # a disabled config is not validated
        self.scan, self.chunk = scan, chunk
        self.elevation = torch.as_tensor(np.asarray(patch_elevation, dtype=np.float32))
        self.sums = dict.fromkeys(_SUMS, 0.0)
        self.batches = 0
        self._batch: Batch | None = None
        net.blocks[self.block].attn.register_forward_pre_hook(self._hook)

    def arm(self, batch: Batch, lead_index: int) -> None:
        """Measure on the next forward when this is lead 0 of one of the first PROBE_BATCHES batches."""
        self._batch = batch if lead_index == 0 and self.batches < PROBE_BATCHES else None

    def _hook(self, attn: torch.nn.Module, args: tuple) -> None:
        if self._batch is None:
            return
        batch, self._batch = self._batch, None
        self.batches += 1
        x, fields = args[0], args[1] if len(args) > 1 else None
        keep = batch.valid.to(x.device)
        order = batch.order_for(self.scan)
        z = self.elevation.to(x.device).expand(x.shape[0], -1)
        z = to_sequence(z, None if order is None else order.to(x.device, torch.long))[keep]
        if fields is not None:  # per-token (B, N) fields of the real samples only
            fields = dataclasses.replace(fields, **{f.name: getattr(fields, f.name)[keep] for f in dataclasses.fields(fields)
                                                    if getattr(fields, f.name) is not None})
        if keep.any():
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                self._measure(attn, x[keep].float(), z, fields)

    def _measure(self, attn: Any, x: Tensor, z: Tensor, fields: TokenFields | None) -> None:
        bsz, n, dim = x.shape
        q, k, _ = attn.qkv(x).reshape(bsz, n, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
        ops = None if attn.physics is None else attn.physics.operands(fields)
        for s in range(0, n, self.chunk):
            logits = q[:, :, s : s + self.chunk] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            zq = z[:, s : s + self.chunk]
            self.sums["without_bias"] += float(uphill_mass(logits.softmax(-1), zq, z))
            if ops is not None:
                biased = (logits + attn.physics.rows(ops, s, s + self.chunk).float()).softmax(-1)
                self.sums["with_bias"] += float(uphill_mass(biased, zq, z))
            self.sums["uphill_pairs"] += float((zq[:, :, None] - z[:, None, :] > UPHILL_M).sum()) * q.shape[1]
        self.sums["rows"] += float(bsz * q.shape[1] * n)
        self.sums["pairs"] += float(bsz * q.shape[1] * n * n)

    def as_vector(self) -> np.ndarray:
        """The sums in a fixed order, for an all-reduce across ranks."""
        return np.array([self.sums[k] for k in _SUMS], dtype=np.float64)

    def result(self, vec: np.ndarray, physics: bool) -> dict[str, Any]:
        """metrics.json's `diagnostics.uphill_attention_share` from the (merged) sums `vec`: attention mass
        uphill per query row with and without the bias, and `uniform`, the share of uphill pairs."""
        s = dict(zip(_SUMS, vec.tolist()))
        rows, pairs = s["rows"], s["pairs"]
        return {"block": self.block, "threshold_m": UPHILL_M, "query_rows": int(rows),
                "with_bias": s["with_bias"] / rows if physics and rows > 0 else None,
                "without_bias": s["without_bias"] / rows if rows > 0 else None,
                "uniform": s["uphill_pairs"] / pairs if pairs > 0 else None}
