"""Terrain strata of a grid (mountain, basin, plain) from its DEM, for terrain-stratified skill.

The barrier bias should matter where terrain blocks transport, so skill is also reported per stratum:

- `mountain`: the top quartile of rough cells, i.e. elevation standard deviation in a `window` x
  `window` neighbourhood strictly above its 75th percentile over the valid cells (strict, so a
  mostly flat domain does not turn flat cells into mountains when the percentile is 0 m);
- `basin`: enclosed depressions found from the DEM alone. The DEM is filled by morphological
  reconstruction by erosion (Soille 2004, "Morphological Image Analysis", 2nd ed., sec. 6.3.6 fillhole,
  and Soille & Gratin 1994): a depression is filled up to its lowest spill point, and a cell whose fill
  depth (filled - DEM) exceeds `depth_m` lies below all the terrain around it, like the Sichuan Basin.
  Cells outside `valid` (sea) and the domain edge are outlets, so a low coast or a valley running off the
  domain is not a basin. 100 m by default: deeper than the few-metre to tens-of-metres pits that
  averaging a DEM onto a coarse grid leaves, shallower than the large basins of the region
  (Sichuan floor ~400-500 m under rims of 1,500-3,000 m);
- `plain`: every other valid cell.

Exclusive, in the order of STRATA: a cell that is both rough and in a depression is a mountain cell
(roughness is what the barrier acts on). Cells outside `valid` are in no stratum.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

STRATA = ("mountain", "basin", "plain")
BASIN_DEPTH_M = 100.0
ROUGHNESS_WINDOW = 3


def local_std(elevation: np.ndarray, window: int = ROUGHNESS_WINDOW) -> np.ndarray:
    """(H, W) population std of elevation in a `window` x `window` neighbourhood (edges repeated)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of cells, got {window}")
    pad = window // 2
    padded = np.pad(np.asarray(elevation, dtype=np.float64), pad, mode="edge")
    return sliding_window_view(padded, (window, window)).std(axis=(-2, -1))


def fill_depressions(elevation: np.ndarray, outlet: np.ndarray) -> np.ndarray:
    """The DEM with every depression filled to its spill point: reconstruction by erosion of a marker that
    is the DEM on `outlet` cells (and the domain edge) and +inf elsewhere (Soille 2004, sec. 6.3.6)."""
    dem = np.asarray(elevation, dtype=np.float64)
    seed = outlet.copy()
    seed[0, :] = seed[-1, :] = seed[:, 0] = seed[:, -1] = True
    marker = np.where(seed, dem, np.inf)
    while True:  # geodesic erosion until stable; each pass lowers the water level by one cell of spread
        lowered = np.maximum(ndimage.grey_erosion(marker, size=(3, 3), mode="nearest"), dem)
        if np.array_equal(lowered, marker):
            return marker
        marker = lowered


def terrain_strata(elevation: np.ndarray, valid: np.ndarray, *, depth_m: float = BASIN_DEPTH_M,
                   window: int = ROUGHNESS_WINDOW) -> dict[str, np.ndarray]:
    """Exclusive (H, W) bool masks, one per name in STRATA, over the `valid` cells of `elevation` (m)."""
    elevation, valid = np.asarray(elevation), np.asarray(valid, dtype=bool)
    if elevation.shape != valid.shape or elevation.ndim != 2:
        raise ValueError(f"elevation {elevation.shape} and valid {valid.shape} must be the same (H, W) grid")
    if not np.isfinite(elevation[valid]).all():
        raise ValueError("elevation has NaN/inf on valid cells: fill the DEM (e.g. 0 m over sea) before stratifying")
    dem = np.where(np.isfinite(elevation), elevation, 0.0)
    rough = local_std(dem, window)
    cut = np.percentile(rough[valid], 75) if valid.any() else np.inf
    mountain = valid & (rough > cut)
    basin = valid & ~mountain & (fill_depressions(dem, ~valid) - dem > depth_m)
    return {"mountain": mountain, "basin": basin, "plain": valid & ~mountain & ~basin}
