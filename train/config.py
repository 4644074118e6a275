"""The whole experiment file, typed: pipeline sections + model + train + evaluate + ablate.

One YAML drives every stage, so a run directory's checkpoint can carry the exact config that made
it (as plain JSON data) and `evaluate`/`ablate` can rebuild the same model and data from it.
Every section forbids unknown keys, so a typo is an error that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from model.config import ModelConfig
from model.variables import unknown_names
from pipeline.config import PipelineConfig
from topoflow.config import Strict, apply_overrides, read_yaml, validate_section
from topoflow.errors import ConfigError


class TrainConfig(Strict):
    """Optimisation, schedule, precision, logging and checkpointing of `python -m train fit`."""

    run_dir: Path = Path("runs/default")
    seed: int = 0
    epochs: int = Field(default=10, gt=0, description="passes over the train split (unless max_steps)")
    max_steps: int | None = Field(default=None, gt=0, description="optimiser steps; overrides epochs when set")
    batch_size: int = Field(default=4, gt=0, description="samples per rank per micro-batch")
    eval_batch_size: int = Field(default=4, gt=0)
    num_workers: int = Field(default=0, ge=0, description="DataLoader workers per rank")
    threads: int | None = Field(default=None, gt=0, description="torch threads per rank; None = the cores this "
                                "process owns (affinity, SLURM cpus-per-task) / torchrun's ranks on the node")
    shuffle_buffer: int = Field(
        default=128, ge=1, description="samples held by the loader's shuffle buffer; about 2 x shard.max_count mixes "
        "consecutive batches' times better than shard version 1 did (benchmarks/results/loader.json); it holds "
        "about shuffle_buffer / max_count + 1 shards per loader worker in memory")
    lr: float = Field(default=5e-4, gt=0)
    min_lr: float = Field(default=1e-6, ge=0, description="end of the cosine decay")
    warmup_steps: int = Field(default=100, ge=0, description="linear warmup from lr/100 to lr")
    weight_decay: float = Field(default=0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(default=1.0, gt=0, description="max global grad norm; None = no clipping")
    residual: bool = Field(
        default=False,
        description="predict the change from the input's target fields, in units of its per-lead spread "
                    "(train.residual; starts at persistence skill) instead of the fields themselves (ClimaX); "
                    "keep False to fine-tune ClimaX-style checkpoints",
    )
    accumulate: int = Field(default=1, gt=0, description="micro-batches per optimiser step")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="bf16", description="autocast dtype on CUDA (fp16 adds a GradScaler for pre-Ampere GPUs); CPU runs fp32"
    )
    val_every: int = Field(default=0, ge=0, description="validate every N optimiser steps; 0 = at each epoch end")
    val_batches: int | None = Field(default=None, gt=0, description="cap on validation batches; None = whole split")
    checkpoint_every: int = Field(default=50, gt=0, description="write last.ckpt every N optimiser steps")
    save_top_k: int = Field(default=3, ge=0, description="best checkpoints by val loss to keep")
    log_every: int = Field(default=10, gt=0, description="optimiser steps between CSV/TensorBoard rows")
    init_from: Path | None = Field(default=None, description="checkpoint to fine-tune from (model weights only)")
    init_variables: list[str] | Literal["positional", "climax"] | None = Field(
        default=None,
        description="the variables of init_from's checkpoint, in its order, for a checkpoint that does not name them "
                    "(ClimaX's releases): names such as 10m_u_component_of_wind are matched to ours by alias "
                    "(model.variables.ALIASES); `climax` = ClimaX's default_vars; `positional` = checkpoint variable "
                    "j is model variable j. Names the checkpoint carries itself always win",
    )
    freeze_backbone: bool = Field(
        default=False, description="with init_from: train only the head and the weights the checkpoint did not "
                                   "supply whole (new, dropped or partly loaded tensors)"
    )
    strict_data: bool = Field(default=False, description="a corrupt shard is a hard error instead of skipped")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.freeze_backbone and self.init_from is None:
            raise ValueError("freeze_backbone needs init_from: a backbone that was never trained cannot be frozen")
        if self.init_variables is not None and self.init_from is None:
            raise ValueError("init_variables names the variables of init_from's checkpoint: set init_from too")
        if isinstance(self.init_variables, list):
            twice = sorted({v for v in self.init_variables if self.init_variables.count(v) > 1})
            if twice or not self.init_variables:
                raise ValueError(f"init_variables must list each checkpoint variable once, got {self.init_variables}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


class EvaluateConfig(Strict):
    """`python -m train evaluate`: which checkpoint, where the report goes, what to draw."""

    checkpoint: Path | None = Field(default=None, description="None = best checkpoint in train.run_dir")
    output: Path | None = Field(default=None, description="report folder; None = <train.run_dir>/report")
    split: Literal["val", "test"] = "test"
    max_batches: int | None = Field(default=None, gt=0, description="cap on evaluated batches; None = whole split")
    map_lead_h: int = Field(default=24, gt=0, description="lead drawn in the prediction/truth/error maps")


class AblationVariant(Strict):
    """One ablation arm: a name and the `--set`-style overrides that define it."""

    name: str
    overrides: list[str] = []


DEFAULT_VARIANTS = [
    AblationVariant(name="no_physics", overrides=["model.scan=none", "model.physics.enabled=false"]),
    AblationVariant(name="scan_only", overrides=["model.scan=regional", "model.physics.enabled=false"]),
    AblationVariant(
        name="scan_barrier_uphill",
        overrides=["model.scan=regional", "model.physics.enabled=true", "model.physics.direction=uphill"],
    ),
    AblationVariant(
        name="barrier_key_higher",
        overrides=["model.scan=regional", "model.physics.enabled=true", "model.physics.direction=key_higher"],
    ),
    AblationVariant(
        name="multiplicative",
        overrides=["model.scan=regional", "model.physics.enabled=true", "model.physics.form=multiplicative"],
    ),
]


class AblateConfig(Strict):
    """`python -m train ablate`: variants x seeds, and the reference experiment's success criteria."""

    run_dir: Path = Path("runs/ablate")
    variants: list[AblationVariant] = DEFAULT_VARIANTS
    seeds: list[int] = [0, 1, 2]
    baseline_val_loss: float = Field(default=0.3557, description="reference wind-scanning baseline")
    target_val_loss: float = Field(default=0.32, description="reference success threshold (physics fine-tune)")

    @model_validator(mode="after")
    def _unique(self) -> "AblateConfig":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"ablate.variants needs distinct names, got {names}")
        if not self.seeds:
            raise ValueError("ablate.seeds is empty: give at least one seed")
        return self


class ExperimentConfig(PipelineConfig):
    """Everything one experiment file holds; usable wherever a PipelineConfig is expected."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ablate: AblateConfig = AblateConfig()

    @model_validator(mode="after")
    def _known_init_variables(self) -> "ExperimentConfig":
        """A misspelt checkpoint variable would silently leave its model variable at init: refuse it now."""
        names = self.train.init_variables
        unknown = unknown_names(names, self.data.variable_names) if isinstance(names, list) else []
        if unknown:
            raise ValueError(
                f"train.init_variables: {', '.join(unknown)} is neither a model variable (data.variables: "
                f"{self.data.variable_names}) nor a known ClimaX/ERA5/CAMS name (model.variables.ALIASES, "
                "CLIMAX_DEFAULT_VARS): fix the spelling")
        return self


def experiment_from_dict(raw: dict[str, Any], source: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Validate an already-parsed experiment dict (e.g. the config stored in a checkpoint)."""
    return validate_section(ExperimentConfig, raw, source, overrides)


def load_experiment_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override (`section.key=value`, YAML-parsed) and validate an experiment file."""
    raw = apply_overrides(read_yaml(path), overrides)
    cfg = experiment_from_dict(raw, str(path), overrides)
    for variant in cfg.ablate.variants:  # a typo in a variant must fail now, not hours into an ablation
        with_variant = [*(overrides or []), *variant.overrides]
        try:
            experiment_from_dict(apply_overrides(read_yaml(path), with_variant), str(path), with_variant)
        except ConfigError as exc:
            raise ConfigError(f"ablate variant {variant.name!r}: {exc}") from None
    return cfg
