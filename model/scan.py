"""Wind-scan orders in pure torch, for users who have winds but not the pipeline's feature store.

Implements DESIGN.md's exact scan rule with the same float64 operations as `pipeline.scan`, so the
orders agree bit for bit; batched over any leading dims and usable on GPU. No loop over regions:
all regions share a shape, so one (sectors + 1)-row table of local orders is gathered by sector.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def _region_mean_wind(u: Tensor, v: Tensor, regions: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Magnitude-weighted mean wind per region, (..., RY*RX); all-still regions get (0, 0) (calm)."""
    *lead, h, w = u.shape
    ry, rx = regions
    u64, v64 = u.to(torch.float64), v.to(torch.float64)
    speed = torch.hypot(u64, v64)

    def block_sum(a: Tensor) -> Tensor:
        return a.reshape(*lead, ry, h // ry, rx, w // rx).sum(dim=(-3, -1)).reshape(*lead, ry * rx)

    wsum = block_sum(speed)
    safe = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    return block_sum(speed * u64) / safe, block_sum(speed * v64) / safe


def _snap_sector(um: Tensor, vm: Tensor, sectors: int, calm_threshold: float) -> Tensor:
    """Nearest theta_k = 2*pi*k/sectors to atan2(v, u), lower k on an exact tie; -1 when calm."""
    theta = torch.atan2(vm, um)[..., None]
    centres = 2 * math.pi * torch.arange(sectors, dtype=torch.float64, device=um.device) / sectors
    diff = torch.remainder(theta - centres, 2 * math.pi)
    dist = torch.minimum(diff, 2 * math.pi - diff)
    sector = torch.argmin(dist, dim=-1)  # first minimum = lowest k
    calm = torch.hypot(um, vm) < calm_threshold
    return torch.where(calm, torch.full_like(sector, -1), sector)


def _local_orders(rows: int, cols: int, sectors: int, device: torch.device) -> Tensor:
    """(sectors + 1, rows*cols) local raster indices in scan order; row 0 = calm (raster)."""
    idx = torch.arange(rows * cols, device=device)
    r = (idx // cols).to(torch.float64)
    c = (idx % cols).to(torch.float64)
    theta = 2 * math.pi * torch.arange(sectors, dtype=torch.float64, device=device)[:, None] / sectors
    proj = torch.round(c * torch.cos(theta) + r * torch.sin(theta), decimals=9)
    return torch.cat([idx[None], torch.argsort(proj, dim=-1, stable=True)])


def scan_order_from_wind(
    u: Tensor,
    v: Tensor,
    patch_size: int,
    regions: tuple[int, int],
    sectors: int = 16,
    calm_threshold: float = 0.5,
    mode: Literal["regional", "global", "none"] = "regional",
) -> Tensor:
    """Scan orders (..., tokens) int64 (sequence position -> spatial token) from cell winds (..., H, W).

    u east, v north, latitude ascending (row 0 = south). `regions` is the region grid (RY, RX);
    `global` treats the whole grid as one region, `none` is the identity.
    """
    if u.shape != v.shape:
        raise ValueError(f"u {tuple(u.shape)} and v {tuple(v.shape)} differ in shape")
    *lead, h, w = u.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"grid {h}x{w} is not divisible by patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    if mode == "none":
        return torch.arange(gh * gw, device=u.device).expand(*lead, gh * gw).clone()
    ry, rx = (1, 1) if mode == "global" else regions
    if gh % ry or gw % rx:
        raise ValueError(f"patch grid {gh}x{gw} is not divisible by regions {ry}x{rx}")
    rh, rw = gh // ry, gw // rx
    sector = _snap_sector(*_region_mean_wind(u, v, (ry, rx)), sectors, calm_threshold)  # (..., R)
    table = _local_orders(rh, rw, sectors, u.device)
    local_token = (table // rw) * gw + table % rw  # local index -> offset from the region's SW token
    region = torch.arange(ry * rx, device=u.device)
    base = (region // rx) * rh * gw + (region % rx) * rw  # SW token of each region
    order = base[:, None] + local_token[sector + 1]  # (..., R, rh*rw)
    return order.reshape(*lead, gh * gw)
