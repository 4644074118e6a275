"""The patch layout: grid, patch size and region grid, and every count derived from them.

Pipeline, model and trainer all need the patch grid and the token count; they read them from one
`PatchLayout` (carried in the store's record and the shard manifest) instead of recomputing them.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from topoflow.config import Strict


# how tokens are ordered into the sequence (DESIGN.md "Wind scanning"): per region, one domain sector, or raster
ScanMode = Literal["regional", "global", "none"]


def order_dtype(n_tokens: int) -> np.dtype:
    """dtype of a scan order: int16 while every token index fits, else int32 (DESIGN.md)."""
    return np.dtype(np.int16) if n_tokens <= 32767 else np.dtype(np.int32)


def check_divisible(grid: tuple[int, int], patch_size: int, regions: tuple[int, int]) -> None:
    """ValueError naming the fix unless patches tile the grid and regions tile the patch grid."""
    (h, w), p, (ry, rx) = grid, patch_size, regions
    if min(h, w, ry, rx) <= 0:
        raise ValueError(f"grid {h}x{w} and regions {ry}x{rx} must be positive")
    if h % p or w % p:
        raise ValueError(f"grid {h}x{w} is not divisible by patch_size {p}: choose a patch size that divides both")
    gh, gw = h // p, w // p
    if gh % ry or gw % rx:
        raise ValueError(f"patch grid {gh}x{gw} (grid {h}x{w} / patch {p}) is not divisible by regions "
                         f"{ry}x{rx}: choose regions that divide the patch grid")


class PatchLayout(Strict):
    """A (n_lat, n_lon) grid cut into square patches, the patch grid cut into a grid of regions.

    Tokens are numbered in raster order over the patch grid (row 0 = south), regions likewise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: tuple[int, int] = Field(description="(n_lat, n_lon) cells")
    patch_size: int = Field(gt=0)
    regions: tuple[int, int] = Field(description="(region rows, region cols)")

    @model_validator(mode="after")
    def _divisible(self) -> "PatchLayout":
        check_divisible(self.grid, self.patch_size, self.regions)
        return self

    @cached_property
    def patch_grid(self) -> tuple[int, int]:
        """(patch rows, patch cols)."""
        return self.grid[0] // self.patch_size, self.grid[1] // self.patch_size

    @cached_property
    def n_tokens(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @cached_property
    def n_regions(self) -> int:
        return self.regions[0] * self.regions[1]

    @cached_property
    def order_dtype(self) -> np.dtype:
        return order_dtype(self.n_tokens)
