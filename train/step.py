"""One forecast step, shared by fit, evaluate and the benchmarks: forward, training loss, validation.

`StepContext` holds what every step reads besides the batch: the shard set, the device-cached input
channels, the scan mode, the residual scale and the latitude weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from topoflow.layout import ScanMode
from train.batch import Batch
from train.distributed import all_reduce_sum
from train.inputs import InputAssembler
from train.loader import ShardStream
from train.loss import latitude_weights, weighted_mse, weighted_sq_sums
from train.residual import add_persistence, lead_scale, residual_scale
from train.shards import ShardSet


@dataclass(frozen=True)
class StepContext:
    """Everything a step needs besides the network and the batch (tensors on the run's device)."""

    shards: ShardSet
    inputs: InputAssembler
    scan: ScanMode
    scale: Tensor | None  # (n_leads, P) residual change scale; None = forecast the state itself
    lat_w: Tensor
    precision: str
    device: torch.device

    @classmethod
    def create(cls, shards: ShardSet, scan: ScanMode, residual: bool, precision: str, device: torch.device,
               scale: Tensor | None = None) -> "StepContext":
        """The context of a run; `scale` overrides the shard set's (a checkpoint keeps its own)."""
        if residual and scale is None:
            scale = residual_scale(shards)
        return cls(shards, InputAssembler(shards, device), scan, scale.to(device) if residual else None,
                   latitude_weights(shards.lat).to(device), precision, device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on CUDA; CPU runs fp32 (CPU autocast is slower than fp32 there)."""
        if self.device.type == "cuda" and self.precision != "fp32":
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return contextlib.nullcontext()


def forward(net: nn.Module, batch: Batch, ctx: StepContext, lead_times: Tensor | None = None) -> Tensor:
    """The model on one batch (normalised in and out): full input assembled on the device, scan order
    chosen by the model config, persistence added back when residual."""
    lead = batch.lead_times if lead_times is None else lead_times
    out = net(ctx.inputs(batch.x), lead, ctx.shards.variables, batch.order_for(ctx.scan), batch.wind_speed)
    if ctx.scale is None:
        return out
    return add_persistence(out, batch.x, ctx.shards.target_index, ctx.scale, ctx.shards.leads_h, lead)


def training_loss(net: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
    """The training objective of one batch: lat-weighted masked MSE, in change units when residual."""
    change = None if ctx.scale is None else lead_scale(ctx.scale, ctx.shards.leads_h, batch.lead_times)
    with ctx.autocast():  # the loss itself runs in float32 (weighted_sq_sums)
        preds = forward(net, batch, ctx)
    return weighted_mse(preds, batch.y, batch.mask, ctx.lat_w, change)


def forecasts_per_lead(net: nn.Module, batch: Batch, ctx: StepContext) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(prediction, target, mask) at each of the batch's leads, every sample forecast to that lead: how
    validation and the diagnostics score a batch (training draws one lead per sample instead)."""
    for li, lead in enumerate(batch.lead_times):
        with ctx.autocast():
            preds = forward(net, batch, ctx, lead.expand(batch.x.shape[0]))
        yield preds, batch.y[:, li], batch.mask[:, li]


@dataclass(frozen=True)
class Validation:
    """One validation pass: `loss`, the lat-weighted normalised MSE over every target and lead (what best-k
    ranks by), and `rmse`, each target's lat-weighted RMSE over every lead in its own units."""

    loss: float
    rmse: dict[str, float]


@torch.no_grad()
def validate(net: nn.Module, loader: ShardStream, ctx: StepContext, max_batches: int | None) -> Validation:
    """The whole val split at every lead, sums added across ranks before dividing."""
    net.eval()
    loader.load_state_dict({**loader.state_dict(), "position": 0})  # from the first batch, even after a capped pass
    targets = ctx.shards.targets
    sums = torch.zeros(1 + len(targets), 2, dtype=torch.float64, device=ctx.device)  # all, then per target
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(ctx.device, non_blocking=True)
        for preds, y, mask in forecasts_per_lead(net, batch, ctx):
            sums[0] += torch.stack(weighted_sq_sums(preds, y, mask, ctx.lat_w)).double()
            for p in range(len(targets)):
                sums[1 + p] += torch.stack(weighted_sq_sums(preds[:, p], y[:, p], mask[:, p], ctx.lat_w)).double()
    net.train()
    all_reduce_sum(sums)
    mse = torch.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1], torch.full_like(sums[:, 0], math.nan))
    std = ctx.shards.input_std[ctx.shards.target_index]  # normalised -> target units
    return Validation(float(mse[0]), {t: float(mse[1 + p].sqrt()) * float(std[p]) for p, t in enumerate(targets)})
