"""The embedded DEM: pvlib's global 1/12-degree elevation map, area-averaged onto the target grid.

The build's built-in `dem_elevation` / `dem_land_fraction` (the barrier's elevation when no source
gives one) and the embedded sample's terrain both come from here.

pvlib ships `pvlib/data/Altitude.h5` (Mapzen/tilezen terrain, see `pvlib.location.lookup_altitude`):
one uint8 dataset `Altitude` of shape (2160, 4320); row 0 is the northernmost 1/12-degree band
(cell centre 90 - (i + 0.5)/12), column 0 starts at 180 W (centre -180 + (j + 0.5)/12); the value
v encodes v * 28 - 450 m and 255 means "no data" (open ocean). Using it needs no download, so the
sample runs on a fresh machine and still has the Tibetan plateau, the Sichuan basin and the North
China plain where they really are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import DomainConfig
from topoflow.errors import ConfigError, SourceError

CELLS_PER_DEGREE = 12
NO_DATA = 255
STEP_M = 28.0
OFFSET_M = -450.0


@dataclass(frozen=True)
class Terrain:
    """Elevation (m, ocean counted as 0 m) and land fraction on a grid with ASCENDING latitude."""

    elevation: np.ndarray  # (n_lat, n_lon) float64, area mean, ocean parts as 0 m
    land_fraction: np.ndarray  # (n_lat, n_lon) float64 in [0, 1]: share of cells with data

    @property
    def land_sea_mask(self) -> np.ndarray:
        """0/1 mask: a cell is land when at least half of its area has elevation data."""
        return (self.land_fraction >= 0.5).astype(np.float32)


def altitude_file() -> Path:
    """Path of the elevation map inside the installed pvlib package."""
    import pvlib

    path = Path(pvlib.__file__).parent / "data" / "Altitude.h5"
    if not path.is_file():
        raise SourceError(
            f"{path} is missing: the sample needs pvlib's bundled elevation map; reinstall pvlib (pip install pvlib)"
        )
    return path


def _overlap(edges: np.ndarray, n_src: int, periodic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fractional overlap of target cells [edges[k], edges[k+1]) (in source-index units) with source cells.

    Returns (weights (n_target, n_used), source indices (n_used,)); rows sum to the target width.
    """
    lo, hi = np.floor(edges.min()).astype(int), np.ceil(edges.max()).astype(int)
    idx = np.arange(lo, hi)
    left = np.maximum(edges[:-1, None], idx[None, :])
    right = np.minimum(edges[1:, None], idx[None, :] + 1)
    weights = np.clip(right - left, 0.0, None)
    if periodic:
        idx = idx % n_src
    elif lo < 0 or hi > n_src:
        raise ConfigError(f"domain reaches outside the elevation map (source rows {lo}..{hi}): keep latitudes in -90..90")
    return weights, idx


def regrid_elevation(domain: DomainConfig, path: Path | None = None) -> Terrain:
    """Area-mean elevation and land fraction of pvlib's map on the configured lat/lon grid.

    Each target cell averages the source cells it overlaps, weighted by overlap area
    (fraction of a cell in latitude x longitude, times cos(latitude) of the source row). No-data
    cells (ocean) count as 0 m, so a coastal cell's elevation is the area mean over land and sea.
    """
    with h5py.File(path or altitude_file(), "r") as f:
        codes = f["Altitude"]
        n_rows, n_cols = codes.shape
        lat_edges = domain.lat_south + domain.resolution * np.arange(domain.n_lat + 1)
        lon_edges = domain.lon_west + domain.resolution * np.arange(domain.n_lon + 1)
        # source index space: row grows southward from 90 N, column eastward from 180 W
        # rows: target cells north -> south here (ascending source index), flipped back below
        wy, rows = _overlap((90.0 - lat_edges[::-1]) * CELLS_PER_DEGREE, n_rows, periodic=False)
        wx, cols = _overlap((lon_edges + 180.0) * CELLS_PER_DEGREE, n_cols, periodic=True)
        block = codes[rows.min() : rows.max() + 1][rows - rows.min()][:, cols]
    wy = wy * np.cos(np.deg2rad(90.0 - (rows + 0.5) / CELLS_PER_DEGREE))[None, :]
    valid = block != NO_DATA
    metres = np.where(valid, block.astype(np.float64) * STEP_M + OFFSET_M, 0.0)
    area = wy.sum(1)[:, None] * wx.sum(1)[None, :]
    elevation = (wy @ metres @ wx.T / area)[::-1]
    land = (wy @ valid.astype(np.float64) @ wx.T / area)[::-1]
    return Terrain(elevation=elevation, land_fraction=np.clip(land, 0.0, 1.0))
