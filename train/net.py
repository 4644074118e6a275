"""Build the model an experiment describes, shaped by the shard set it will read.

The shard set's record, not the YAML, is the truth about variables, grid and patching (it is what the
tensors will look like); `check_shards` refuses a shard set whose record differs from the config.
"""

from __future__ import annotations

import torch

from model import ModelConfig, TopoFlowClimaX
from pipeline.config import DataConfig
from topoflow.errors import ConfigError
from train.shards import ShardSet


def check_shards(data: DataConfig, shards: ShardSet) -> None:
    """Refuse a shard set built from another config than `data`, naming each differing key."""
    why = shards.record.mismatch(data)
    if why:
        raise ConfigError(f"the shard set {data.shards} was built from another config:\n  " + "\n  ".join(why) +
                          "\nrebuild and re-shard it for this config (`python -m pipeline build --overwrite`, then "
                          "`python -m pipeline shard`), or use the config it was built with")


def build_model(model_cfg: ModelConfig, shards: ShardSet) -> TopoFlowClimaX:
    """TopoFlowClimaX for the shard set's variables and layout, with its patch elevation registered."""
    net = TopoFlowClimaX(model_cfg, in_vars=shards.variables, out_vars=shards.targets, layout=shards.layout)
    net.set_static(torch.from_numpy(shards.patch_elevation.astype("float32")))
    return net
