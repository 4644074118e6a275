"""Model presets and a back-of-the-envelope memory estimate (what fits on which device, and why flex/sdpa).

Activation figures count the tensors autograd keeps for backward (fp32 unless bytes_per_value says
otherwise); they are estimates to plan batch sizes, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model.attention import KEY_TILE
from model.config import ModelConfig
from model.net import TopoFlowClimaX
from topoflow.layout import PatchLayout

INPUTS = ("u", "v", "temp", "rh", "psfc", "pm10", "so2", "no2", "co", "o3", "lat2d", "lon2d", "pm25", "elevation", "population")
TARGETS = ("pm25", "pm10", "so2", "no2", "co", "o3")
Backend = Literal["sdpa", "flex", "naive"]


@dataclass(frozen=True)
class Preset:
    """Everything needed to build a model of one size."""

    cfg: ModelConfig
    layout: PatchLayout
    in_vars: tuple[str, ...] = INPUTS
    out_vars: tuple[str, ...] = TARGETS

    def build(self) -> TopoFlowClimaX:
        return TopoFlowClimaX(self.cfg, self.in_vars, self.out_vars, self.layout)


PRESETS: dict[str, Preset] = {
    # configs/topoflow_china.yaml: 128x256, patch 2 -> 8192 tokens, 32x32 regions
    "reference": Preset(ModelConfig(embed_dim=768, depth=8, num_heads=8, drop_path=0.1),
                        PatchLayout(grid=(128, 256), patch_size=2, regions=(32, 32))),
    # configs/demo.yaml: 32x64, patch 2 -> 512 tokens, 4x8 regions; ModelConfig defaults
    "demo": Preset(ModelConfig(), PatchLayout(grid=(32, 64), patch_size=2, regions=(4, 8))),
    # The released ClimaX backbone (microsoft/ClimaX configs/pretrain_climax.yaml, global_forecast_climax.yaml and
    # regional_forecast_climax.yaml, model.net.init_args: embed_dim 1024, depth 8, decoder_depth 2, num_heads 16,
    # mlp_ratio 4, drop_path 0.1) in the layout of its 1.40625-degree checkpoint: a 128x256 grid (our reference
    # grid's shape) in patches of 4 -> 2048 tokens, so that checkpoint loads whole, pos_embed included. Its patch
    # size is in no ClimaX config (those are the 5.625-degree [32, 64], patch 2); the released files give it:
    # 1.40625deg.ckpt is 443432223 bytes, 5.625deg.ckpt 432419871 (huggingface.co/datasets/tungnd/climax_ckpts,
    # commit b65503b), 4 * 2753088 bytes more = fp32 pos_embed (2048 - 512) x 1024 plus, for 48 variables, the
    # token embeddings' and head's 4x4 - 2x2 patch weights (48 x 24588): patch 4. Regions 32x32 as in `reference`.
    "climax": Preset(ModelConfig(embed_dim=1024, depth=8, num_heads=16, mlp_ratio=4.0, decoder_depth=2, drop_path=0.1),
                     PatchLayout(grid=(128, 256), patch_size=4, regions=(32, 32))),
}


def estimate_memory(preset: str | Preset, batch_size: int = 1, backend: Backend = "sdpa", bytes_per_value: int = 4) -> dict[str, float]:
    """Parameters and training memory (bytes) of a preset: weights, optimiser state, activations, bias.

    `attention_bias_bytes` is the extra peak memory of ONE physics block's bias path: `naive` builds the
    full (B, H, N, N) bias and keeps scores and probabilities (3 N x N per head); `sdpa` holds, during one
    chunk's backward, the chunk's bias rows, their autograd state and gradient (about 5 (chunk x N) per
    bias head: one when alpha and the bias are shared by the heads) and a few (chunk x KEY_TILE) tiles per
    head; `flex` only the per-token operands.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    cfg = p.cfg
    with torch.device("meta"):
        net = p.build()
    params = sum(t.numel() for t in net.parameters())
    trainable = sum(t.numel() for t in net.parameters() if t.requires_grad)
    b, n, d, h, v = batch_size, p.layout.n_tokens, cfg.embed_dim, cfg.num_heads, len(p.in_vars)
    embed = 4 * b * v * n * d  # patch tokens, + var embed, var_agg key/value projections
    per_block = (8 + 2 * cfg.mlp_ratio) * b * n * d  # norms, qkv, attention out, proj, fc1, GELU, residuals
    blocks = cfg.depth * per_block if not cfg.checkpoint_activations else cfg.depth * b * n * d + per_block
    head = (2 * cfg.decoder_depth + 1) * b * n * d
    bias_heads = h if cfg.physics.alpha_per_head or cfg.physics.rel_pos_bias else 1
    chunk = min(cfg.chunk_size, n)
    bias_values = {
        "naive": 3 * b * h * n * n,
        "sdpa": 5 * b * bias_heads * chunk * n + 3 * b * h * chunk * min(KEY_TILE, n),
        "flex": 6 * b * n,
    }[backend]
    return {
        "params": float(params),
        "trainable_params": float(trainable),
        "tokens": float(n),
        "weights_bytes": 4.0 * params,
        "optimizer_bytes": 4.0 * (trainable + 2 * trainable),  # grads + AdamW moments, fp32
        "activation_bytes": float(bytes_per_value * (embed + blocks + head)),
        "attention_bias_bytes": float(bytes_per_value * bias_values),
    }
