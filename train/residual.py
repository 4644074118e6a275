"""Residual forecasting: the network predicts the change from persistence, in units of that change.

forecast = x[target] + net(x) * scale[lead, target], with scale = change_std / target_std (the
spread of the target's change over that lead, from the store's record, in normalised units). Why:
the change over 12 h (day and night swap) is several times larger than over 24 h, so an unscaled
residual lets the 12 h behaviour dominate training and leak into the 24 h forecast; scaled, every
lead asks the same effort of the network (GraphCast, Lam et al. 2023, normalises its residual
targets by the std of time differences likewise). The training loss is measured in the same change
units; validation keeps the normalised-state MSE that the reference experiment's thresholds are
expressed in. The scale is saved in every checkpoint, so evaluation uses exactly the numbers the
model was trained with. The output layer starts at zero, so a residual model starts at persistence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from train.shards import ShardSet

log = logging.getLogger("train")


def residual_scale(shards: ShardSet) -> Tensor:
    """(n_leads, P) float32 change_std / target_std; 1 where the record has no usable spread."""
    scale = shards.change_std / shards.target_std.astype(np.float64)[None]
    bad = ~np.isfinite(scale) | (scale <= 0)
    if bad.any():
        missing = [f"{shards.targets[p]}@{shards.leads_h[lead]}h" for lead, p in zip(*np.nonzero(bad))]
        log.warning("no change statistics for %s (the train split is shorter than the lead, or the target never "
                    "changes): their residual uses the target's own std", missing)
        scale = np.where(bad, 1.0, scale)
    return torch.as_tensor(scale, dtype=torch.float32)


def lead_scale(scale: Tensor, leads_h: Sequence[int], lead_times: Tensor) -> Tensor:
    """Rows of `scale` for each sample's lead: (B,) hours -> (B, P, 1, 1) on lead_times' device."""
    table = torch.as_tensor(list(leads_h), dtype=lead_times.dtype, device=lead_times.device)
    hit = lead_times[:, None] == table[None]
    if not bool(hit.any(dim=1).all()):
        unknown = sorted({float(t) for t in lead_times[~hit.any(dim=1)].tolist()})
        raise ValueError(f"lead times {unknown} h are not among the shard set's leads {list(leads_h)}")
    return scale.to(lead_times.device)[hit.int().argmax(dim=1)][:, :, None, None]


def add_persistence(change: Tensor, dynamic: Tensor, target_index: Sequence[int], scale: Tensor,
                    leads_h: Sequence[int], lead_times: Tensor) -> Tensor:
    """Forecast from the network's change (in change units): persistence + change * scale (normalised).

    Targets share their input variable's statistics, so adding the normalised input is exact.
    """
    return change * lead_scale(scale, leads_h, lead_times) + dynamic[:, list(target_index)]


def zero_init_output(net: nn.Module) -> None:
    """Zero the head's last linear layer, so a residual model starts exactly at persistence.

    Gradients still reach that layer at once (its inputs are not zero), so training moves away from
    persistence only where that lowers the loss, instead of first undoing random initial deltas.
    """
    last = [m for m in net.head.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
