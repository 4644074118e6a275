"""Residual forecasting: the network predicts the change from persistence, in units of that change.

forecast = x[target] + net(x) * scale[lead, target], with scale = change_std / target_std (the
spread of the target's change over that lead, from the manifest, in normalised units). Why: the
change over 12 h (day and night swap) is several times larger than over 24 h, so an unscaled
residual lets the 12 h behaviour dominate training and leak into the 24 h forecast; scaled, every
lead asks the same effort of the network (GraphCast, Lam et al. 2023, normalises its residual
targets by the std of time differences likewise). The training loss is measured in the same change
units (`weighted_mse(..., scale=)`); validation keeps the normalised-state MSE that the reference
experiment's thresholds are expressed in. The scale is saved in every checkpoint, so evaluation
uses exactly the numbers the model was trained with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from train.data import Static

log = logging.getLogger("train")


def residual_scale(static: Static) -> torch.Tensor:
    """(n_leads, P) float32 change_std / target_std; 1 where the manifest has no usable spread."""
    scale = static.change_std / static.target_std.astype(np.float64)[None]
    bad = ~np.isfinite(scale) | (scale <= 0)
    if bad.any():
        missing = [f"{static.targets[p]}@{static.leads_h[lead]}h" for lead, p in zip(*np.nonzero(bad))]
        log.warning("no change statistics for %s (the train split is shorter than the lead, or the target never "
                    "changes): their residual uses the target's own std", missing)
        scale = np.where(bad, 1.0, scale)
    return torch.as_tensor(scale, dtype=torch.float32)


def lead_scale(scale: torch.Tensor, leads_h: Sequence[int], lead_times: torch.Tensor) -> torch.Tensor:
    """Rows of `scale` for each sample's lead: (B,) hours -> (B, P, 1, 1) on lead_times' device."""
    table = torch.as_tensor(list(leads_h), dtype=lead_times.dtype, device=lead_times.device)
    hit = lead_times[:, None] == table[None]
    if not bool(hit.any(dim=1).all()):
        unknown = sorted({float(t) for t in lead_times[~hit.any(dim=1)].tolist()})
        raise ValueError(f"lead times {unknown} h are not among the shard set's leads {list(leads_h)}")
    return scale.to(lead_times.device)[hit.int().argmax(dim=1)][:, :, None, None]
