"""AdamW with ClimaX-style parameter groups and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import TrainConfig

# Embedding tables and learned scalars are not "weights" in the L2 sense: decaying them towards 0
# erases the position/variable identity or the physics strength (ClimaX excludes its embeddings too).
NO_DECAY_NAMES = ("pos_embed", "var_embed", "var_query", "lead_time_embed", "lead_phase_embed", "alpha", "rel_pos")


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Matrices and conv kernels decay; biases, norm scales, embeddings and physics alpha do not."""
    return param.ndim >= 2 and not any(key in name for key in NO_DECAY_NAMES)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, split into a decay and a no-decay group."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if uses_weight_decay(name, param) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the base lr at `step`: linear from 1% to 100% over warmup, then cosine to min_lr."""
    if step < warmup_steps:
        return 0.01 + 0.99 * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimiser-step schedule; its state_dict is plain numbers (safe for weights_only loading)."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=total_steps, lr=cfg.lr, min_lr=cfg.min_lr)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
