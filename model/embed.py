"""Sine-cosine embeddings (Vaswani et al. 2017; 2-D variant in ClimaX's channel layout)."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(len(positions), dim): sin of positions * omega in the first half, cos in the second."""
    if dim % 2:
        raise ValueError(f"sincos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """(rows*cols, dim) for a raster patch grid: the first half of the channels encodes the COLUMN, the
    second half the row.

    That is ClimaX's layout (microsoft/ClimaX src/climax/utils/pos_embed.py, `get_2d_sincos_pos_embed`:
    `np.meshgrid(grid_w, grid_h)`, "here w goes first", and the first half is computed from grid[0]), so
    a model trained from scratch starts where a ClimaX model starts.
    """
    if dim % 4:
        raise ValueError(f"2-D sincos embedding needs dim divisible by 4, got {dim}")
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, c.flatten()), sincos_1d(dim // 2, r.flatten())], dim=1)
