"""Build the model an experiment describes, shaped by the shard set it will read.

The shard set's manifest, not the YAML, is the truth about variables, grid and patching (it is what
the tensors will look like), so the model is built from `Static` and the config is checked against it.
"""

from __future__ import annotations

import torch
from torch import nn

from model import ModelConfig, TopoFlowClimaX
from pipeline.config import ConfigError, DataConfig
from train.data import Static


def check_shards_match(data: DataConfig, static: Static) -> None:
    """Refuse a shard set written with other variables/targets/leads/grid than the config declares."""
    wanted = {
        "variables": data.variable_names,
        "targets": list(data.targets),
        "leads_h": list(data.leads_h),
        "grid": [data.domain.n_lat, data.domain.n_lon],
        "patch_size": data.patch_size,
        "regions": list(data.regions),
    }
    found = {
        "variables": list(static.variables),
        "targets": list(static.targets),
        "leads_h": list(static.leads_h),
        "grid": list(static.grid),
        "patch_size": static.patch_size,
        "regions": list(static.regions),
    }
    differ = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
    if differ:
        raise ConfigError(
            f"the shard set {data.shards} does not match the config: {differ} (shards, config); rewrite it with "
            "`python -m pipeline build` and `python -m pipeline shard` for this config"
        )


def build_model(model_cfg: ModelConfig, static: Static) -> TopoFlowClimaX:
    """TopoFlowClimaX for the shard set's variables and grid, with its patch elevation registered."""
    net = TopoFlowClimaX(
        model_cfg,
        in_vars=static.variables,
        out_vars=static.targets,
        img_size=tuple(static.grid),
        patch_size=static.patch_size,
        regions=tuple(static.regions),
    )
    net.set_static(torch.from_numpy(static.patch_elevation.astype("float32")))
    return net


def zero_init_output(net: TopoFlowClimaX) -> None:
    """Zero the head's last linear layer, so a residual model starts exactly at persistence.

    Gradients still reach that layer at once (its inputs are not zero), so training moves away from
    persistence only where that lowers the loss, instead of first undoing random initial deltas.
    """
    last = [m for m in net.head.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
