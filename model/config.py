"""Typed model configuration (the `model:` section of an experiment YAML).

Defaults are the CPU demo size; `model.presets.PRESETS["reference"]` holds the full 8192-token size.
Unknown keys and wrong types are errors naming the key (pydantic, extra="forbid").
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from topoflow.config import Strict
from topoflow.layout import ScanMode


class PhysicsConfig(Strict):
    """Elevation-barrier attention bias (DESIGN.md, "Elevation barrier bias").

    Query i receives from key j; with d = (z_i - z_j)/z0 (`uphill`) or (z_j - z_i)/z0 (`key_higher`)
    and strength s = alpha * m (m the wind modulation, 1 for `none`):
    additive `-s * relu(d)`, multiplicative `log(sigmoid(-s * d))`. The resulting bias VALUES are
    clamped to [-clamp, 0] (alpha itself is not clamped), so the barrier can only ever penalise.
    """

    enabled: bool = True
    blocks: list[int] = Field(default=[0], description="indices of the blocks that get the bias")
    decay: float = Field(
        default=1.0, gt=0, le=1,
        description="alpha of the k-th physics block starts at alpha_init * decay**k (each block learns its own)",
    )
    form: Literal["additive", "multiplicative"] = "additive"
    direction: Literal["uphill", "key_higher"] = "uphill"
    wind_mod: Literal["none", "global", "local"] = Field(
        default="global", description="m = 1 - 0.5*sigmoid(w - 5): w = sample mean (global) or pair mean (local)"
    )
    granularity: Literal["patch", "region"] = "patch"
    alpha_init: float = 2.0
    alpha_per_head: bool = False
    clamp: float = Field(default=10.0, gt=0, description="bias values are clamped to [-clamp, 0]")
    z0: float = Field(default=1000.0, gt=0, description="elevation scale in metres")
    rel_pos_bias: bool = False
    num_buckets: int = Field(default=32, ge=4, description="T5-style buckets per axis (even)")

    @model_validator(mode="after")
    def _check(self) -> "PhysicsConfig":
        if self.num_buckets % 2:
            raise ValueError(f"physics.num_buckets must be even (half per sign), got {self.num_buckets}")
        if len(set(self.blocks)) != len(self.blocks) or any(b < 0 for b in self.blocks):
            raise ValueError(f"physics.blocks must be distinct non-negative block indices, got {self.blocks}")
        return self


class ModelConfig(Strict):
    """ClimaX backbone + wind scanning + physics bias. Defaults: the demo size (trains in minutes on CPU).

    `scan` tells the trainer which precomputed order to feed (`Batch.order_for(cfg.scan)`); the
    model itself applies whatever order it is given.
    """

    embed_dim: int = Field(default=128, gt=0)
    depth: int = Field(default=4, gt=0)
    num_heads: int = Field(default=4, gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0)
    decoder_depth: int = Field(default=2, ge=0)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    scan: ScanMode = "regional"
    scan_pos: Literal["spatial", "sequence"] = Field(
        default="spatial", description="position embedding follows the token (spatial) or the sequence slot"
    )
    physics: PhysicsConfig = PhysicsConfig()
    backend: Literal["auto", "sdpa", "flex"] = "auto"
    chunk_size: int = Field(
        default=256, gt=0,
        description="query rows per bias chunk (sdpa backend): extra memory O(chunk x N); 256 beats 64 (benchmarks/attention.py)",
    )
    checkpoint_activations: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        bad = [b for b in self.physics.blocks if b >= self.depth]
        if self.physics.enabled and bad:
            raise ValueError(f"physics.blocks {bad} do not exist: the model has depth {self.depth}")
        return self
