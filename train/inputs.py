"""The model's full input, assembled on the device from a batch's dynamic channels and cached statics.

Shards carry only the dynamic channels; static channels (elevation, population, ...) and coordinate
channels (lat2d, lon2d) are normalised once, kept on the device, and joined to every batch in the
config's channel order with one gather, so no static layer travels once per sample.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.features import COORDINATE_LAYERS
from pipeline.statistics import grid_moments
from train.shards import ShardSet


def _normalised(layers: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    std = np.where(std > 0, std, 1.0)
    return ((layers - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


class InputAssembler:
    """Callable: (B, V_dynamic, H, W) normalised dynamic channels -> (B, V, H, W) model input."""

    def __init__(self, shards: ShardSet, device: torch.device | str) -> None:
        record, stats = shards.record, shards.manifest.statistics
        static = _normalised(shards.static.astype(np.float64), np.asarray(stats.static_mean), np.asarray(stats.static_std))
        coord_names = record.names("coordinate")
        coords = np.stack([COORDINATE_LAYERS[n](shards.lat, shards.lon) for n in coord_names]) if coord_names \
            else np.empty((0, *static.shape[1:]), np.float64)
        coords = _normalised(coords, *grid_moments(coords))
        self.fixed = torch.from_numpy(np.concatenate([static, coords])).to(device)
        joined = record.names("dynamic") + record.names("static") + coord_names  # the order of torch.cat below
        self.order = torch.tensor([joined.index(n) for n in record.variable_names], device=device)

    def __call__(self, dynamic: Tensor) -> Tensor:
        fixed = self.fixed.to(dynamic.dtype).expand(dynamic.shape[0], -1, -1, -1)
        return torch.cat([dynamic, fixed], dim=1).index_select(1, self.order)
