"""Elevation-barrier attention bias (DESIGN.md) as elementwise pair functions.

The same functions serve both backends: the sdpa backend calls them on broadcast (B, H, chunk, N)
slices, the flex backend on the scalars a FlexAttention `score_mod` sees. Every per-token input is
already in SEQUENCE order (gathered with the batch's scan order by the caller), so a pair (i, j)
always sees the elevations, winds and coordinates of the tokens that sit at positions i and j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import PhysicsConfig


def wind_factor(w: Tensor) -> Tensor:
    """m = 1 - 0.5 * sigmoid(w - 5), w in m/s: strong wind weakens the barrier (at most by half)."""
    return 1.0 - 0.5 * torch.sigmoid(w - 5.0)


def barrier(zq: Tensor, zk: Tensor, strength: Tensor, cfg: PhysicsConfig) -> Tensor:
    """Bias for query elevation zq and key elevation zk (both already divided by z0).

    strength = alpha * m. Values are clamped to [-cfg.clamp, 0].
    """
    d = zq - zk if cfg.direction == "uphill" else zk - zq
    if cfg.form == "additive":
        bias = -strength * torch.relu(d)
    else:
        bias = F.logsigmoid(-strength * d)
    return bias.clamp(-cfg.clamp, 0.0)


def t5_bucket(delta: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5-style bidirectional bucket of an integer offset: exact for small |delta|, log-spaced beyond.

    Half of the buckets are for positive offsets. Works on tensors of any shape, including the
    0-d tensors inside a FlexAttention score_mod.
    """
    half = num_buckets // 2
    exact = max(half // 2, 1)
    sign = (delta > 0).to(torch.int64) * half
    n = delta.abs()
    log_ratio = torch.log(n.to(torch.float32).clamp(min=1.0) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).to(torch.int64)).clamp(max=half - 1)
    return sign + torch.where(n < exact, n, large)


@dataclass
class TokenFields:
    """Per-token side fields in sequence order (all gathered with the same scan order as the tokens)."""

    elevation: Tensor  # (B, N) metres, at the configured granularity
    wind_speed: Tensor | None  # (B, N) m/s, or None when no wind modulation is used
    row: Tensor  # (B, N) patch row (south = 0), for the relative position bias
    col: Tensor  # (B, N) patch column (west = 0)


class PhysicsBias(nn.Module):
    """Learnable parameters of one block's bias: alpha (shape (1,) or (heads,)) and optional T5 tables."""

    def __init__(self, cfg: PhysicsConfig, num_heads: int, alpha_init: float, grid: tuple[int, int]):
        super().__init__()
        self.cfg = cfg
        self.num_heads = num_heads
        self.alpha = nn.Parameter(torch.full((num_heads if cfg.alpha_per_head else 1,), float(alpha_init)))
        self.max_distance = max(max(grid), cfg.num_buckets // 2)
        if cfg.rel_pos_bias:
            self.rel_pos_row = nn.Parameter(torch.zeros(cfg.num_buckets, num_heads))
            self.rel_pos_col = nn.Parameter(torch.zeros(cfg.num_buckets, num_heads))

    def operands(self, f: TokenFields) -> dict[str, Tensor]:
        """The tensors the pair function reads: per-token (B, N), per-sample (B,), per-head (H,)."""
        cfg = self.cfg
        ops = {"z": f.elevation / cfg.z0, "alpha": self.alpha.expand(self.num_heads)}
        if cfg.wind_mod != "none" and f.wind_speed is None:
            raise ValueError(f"physics.wind_mod={cfg.wind_mod!r} needs wind_speed (B, L): pass the batch's wind_speed")
        if cfg.wind_mod == "global":
            ops["m"] = wind_factor(f.wind_speed.mean(dim=1))
        elif cfg.wind_mod == "local":
            ops["w"] = f.wind_speed
        if cfg.rel_pos_bias:
            ops.update(row=f.row, col=f.col, table_row=self.rel_pos_row, table_col=self.rel_pos_col)
        return ops

    def pair(self, ops: dict[str, Tensor], b, h, qi, ki) -> Tensor:
        """Bias of query slot qi and key slot ki of sample b, head h (indices or broadcastable index tensors)."""
        cfg = self.cfg
        strength = ops["alpha"][h]
        if cfg.wind_mod == "global":
            strength = strength * ops["m"][b]
        elif cfg.wind_mod == "local":
            strength = strength * wind_factor(0.5 * (ops["w"][b, qi] + ops["w"][b, ki]))
        bias = barrier(ops["z"][b, qi], ops["z"][b, ki], strength, cfg)
        if cfg.rel_pos_bias:
            nb = cfg.num_buckets
            dr = t5_bucket(ops["row"][b, qi] - ops["row"][b, ki], nb, self.max_distance)
            dc = t5_bucket(ops["col"][b, qi] - ops["col"][b, ki], nb, self.max_distance)
            bias = bias + ops["table_row"][dr, h] + ops["table_col"][dc, h]
        return bias

    def rows(self, ops: dict[str, Tensor], start: int, stop: int) -> Tensor:
        """Dense bias for query slots [start, stop) against all keys: (B, H or 1, stop-start, N)."""
        z = ops["z"]
        bsz, n = z.shape
        dev = z.device
        b = torch.arange(bsz, device=dev).view(-1, 1, 1, 1)
        heads = self.num_heads if (self.cfg.alpha_per_head or self.cfg.rel_pos_bias) else 1  # else broadcast over heads
        h = torch.arange(heads, device=dev).view(1, -1, 1, 1)
        qi = torch.arange(start, min(stop, n), device=dev).view(1, 1, -1, 1)
        ki = torch.arange(n, device=dev).view(1, 1, 1, -1)
        return self.pair(ops, b, h, qi, ki)
