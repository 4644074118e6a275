"""Latitude-weighted MSE in normalised space, counted only where the target is valid and on the loss mask.

cos(lat) weights make each cell count by its area on a regular lat/lon grid (ClimaX's lat-weighted
MSE); normalised space makes the six pollutants comparable. Invalid targets (NaN past the end of the
data, or off the loss mask) are removed with `where`, never multiplied by 0, because NaN * 0 = NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from topoflow.errors import TrainingError


def latitude_weights(lat_deg: np.ndarray | torch.Tensor) -> torch.Tensor:
    """cos(lat) normalised to mean 1 over the grid's latitudes, shape (H,)."""
    lat = torch.as_tensor(np.asarray(lat_deg, dtype=np.float64))
    w = torch.cos(torch.deg2rad(lat))
    return (w / w.mean()).float()


def weighted_sq_sums(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, lat_w: torch.Tensor,
                     scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(w * ((pred - target) / scale)^2), sum(w)) over the cells where `mask`; lat is dim -2.

    Sums (not a mean) so validation can add batches and ranks before dividing once. `scale`
    (broadcastable, e.g. (B, P, 1, 1)) measures errors in other units: residual training uses the
    per-lead spread of the change (train.residual).
    """
    if pred.shape != target.shape or mask.shape != target.shape:
        raise ValueError(f"loss shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)}")
    zero = torch.zeros((), device=pred.device)
    w = lat_w.to(pred.device, torch.float32).view(-1, 1).expand(target.shape[-2:])
    weight = torch.where(mask, w, zero)
    err = pred.float() - torch.nan_to_num(target.float())
    sq = torch.where(mask, (err if scale is None else err / scale) ** 2, zero)
    return (weight * sq).sum(), weight.sum()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, lat_w: torch.Tensor,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w * mask * ((pred - target) / scale)^2) / sum(w * mask): the training loss of one batch.

    Raises ValueError when no cell is valid: a loss over nothing would silently be NaN.
    """
    num, den = weighted_sq_sums(pred, target, mask, lat_w, scale)
    if den <= 0:
        raise TrainingError("the batch has no valid target cell (all NaN or off the loss mask): check the shards and loss mask")
    return num / den
