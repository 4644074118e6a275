"""TopoFlowClimaX: the ClimaX backbone (Nguyen et al. 2023) with wind scanning and the barrier bias.

Parameter names follow ClimaX, so its checkpoints load by name (see model.checkpoint). Wind scanning
is a gather: tokens AND every per-token side field (elevation, wind speed, patch coordinates) go
through the same `to_sequence(., order)`, and `from_sequence` restores spatial order before the head,
so the bias always meets the tokens it belongs to and the output maps are never scrambled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.attention import Attention
from model.config import ModelConfig
from model.embed import sincos_1d, sincos_2d
from model.physics import PhysicsBias, TokenFields
from topoflow.layout import PatchLayout

LEAD_TIME_SCALE = 0.01  # lead time enters as hours / 100, as in ClimaX
DIURNAL_PERIOD_H = 24.0


def lead_phase(lead_times: Tensor) -> Tensor:
    """(B,) hours -> (B, 2) [sin, cos] of the lead's phase in the diurnal cycle.

    ClimaX's linear lead embedding makes 24 h look like "twice 12 h", but near the surface a 24 h
    forecast starts from the same time of day (persistence is good) while 12 h flips day and night
    (boundary layer, photochemistry, traffic): the phase tells the model which is which.
    """
    angle = lead_times[:, None] * (2 * torch.pi / DIURNAL_PERIOD_H)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


def to_sequence(t: Tensor, order: Tensor | None) -> Tensor:
    """Gather (B, L, ...) from spatial to sequence order: out[b, s] = t[b, order[b, s]]."""
    if order is None:
        return t
    index = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
    return torch.gather(t, 1, index)


def from_sequence(t: Tensor, order: Tensor | None) -> Tensor:
    """Scatter (B, L, ...) from sequence back to spatial order (inverse of `to_sequence`)."""
    if order is None:
        return t
    index = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
    return torch.empty_like(t).scatter(1, index, t)


class PatchEmbed(nn.Module):
    """One variable's patch embedding (timm name `proj`): (B, 1, H, W) -> (B, L, D)."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """timm-named MLP: fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block with ClimaX/timm names (norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, attn: Attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, fields: TokenFields | None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), fields))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TopoFlowClimaX(nn.Module):
    """ClimaX forecaster; `forward` returns (B, P, H, W) predictions in spatial order."""

    def __init__(self, cfg: ModelConfig, in_vars: Sequence[str], out_vars: Sequence[str], layout: PatchLayout):
        super().__init__()
        if len(set(in_vars)) != len(in_vars):
            raise ValueError(f"in_vars has duplicates: {list(in_vars)}")
        self.cfg, self.layout = cfg, layout
        self.in_vars, self.out_vars = list(in_vars), list(out_vars)
        self.img_size, self.patch_size, self.regions = layout.grid, layout.patch_size, layout.regions
        self.grid = gh, gw = layout.patch_grid
        patch_size = layout.patch_size
        dim, heads = cfg.embed_dim, cfg.num_heads

        self.token_embeds = nn.ModuleList(PatchEmbed(patch_size, dim) for _ in self.in_vars)
        self.var_embed = nn.Parameter(sincos_1d(dim, torch.arange(len(self.in_vars)))[None])
        self.var_query = nn.Parameter(torch.zeros(1, 1, dim))
        self.var_agg = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.pos_embed = nn.Parameter(sincos_2d(dim, self.grid)[None])  # learnable, as in ClimaX
        self.lead_time_embed = nn.Linear(1, dim)
        self.lead_phase_embed = nn.Linear(2, dim)  # not in ClimaX (zero-initialised, see _init_weights)

        phys = cfg.physics
        physics_rank = {b: k for k, b in enumerate(phys.blocks)} if phys.enabled else {}
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear stochastic depth
        self.blocks = nn.ModuleList()
        for i in range(cfg.depth):
            bias = None
            if i in physics_rank:
                bias = PhysicsBias(phys, heads, phys.alpha_init * phys.decay ** physics_rank[i], self.grid)
            attn = Attention(dim, heads, bias, cfg.backend, cfg.chunk_size)
            self.blocks.append(Block(dim, cfg.mlp_ratio, rates[i], attn))
        self.norm = nn.LayerNorm(dim)
        layers: list[nn.Module] = []
        for _ in range(cfg.decoder_depth):
            layers += [nn.Linear(dim, dim), nn.GELU()]
        layers.append(nn.Linear(dim, len(self.out_vars) * patch_size**2))
        self.head = nn.Sequential(*layers)

        token = torch.arange(layout.n_tokens)
        self.register_buffer("token_row", token // gw, persistent=False)
        self.register_buffer("token_col", token % gw, persistent=False)
        self.register_buffer("elevation", torch.full((layout.n_tokens,), float("nan")), persistent=False)
        self._static_set = False
        self._init_weights()

    def _init_weights(self) -> None:
        """ClimaX init: truncated-normal linears, xavier patch projections, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in self.token_embeds:
            nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.weight.shape[0], -1))
        # zero: a model loaded from a ClimaX checkpoint starts out computing exactly what ClimaX did
        nn.init.zeros_(self.lead_phase_embed.weight)

    @property
    def has_physics(self) -> bool:
        return any(blk.attn.physics is not None for blk in self.blocks)

    def set_static(self, patch_elevation: Tensor | np.ndarray) -> None:
        """Register the static per-patch mean elevation (L,) in metres, raster token order.

        With granularity `region` each patch gets its region's mean. Call once; the buffer follows
        `.to(device)`.
        """
        z = torch.as_tensor(np.asarray(patch_elevation) if not isinstance(patch_elevation, Tensor) else patch_elevation)
        n = self.layout.n_tokens
        if z.shape != (n,):
            raise ValueError(f"patch_elevation has shape {tuple(z.shape)}, expected ({n},) for the {self.grid} patch grid")
        if not torch.isfinite(z).all():
            raise ValueError("patch_elevation has NaN/inf values: fill missing terrain (e.g. 0 m over sea) before set_static")
        z = z.to(torch.float32)
        if self.cfg.physics.granularity == "region":
            (gh, gw), (ry, rx) = self.grid, self.regions
            blocks = z.view(ry, gh // ry, rx, gw // rx)
            z = blocks.mean(dim=(1, 3), keepdim=True).expand_as(blocks).reshape(n)
        self.elevation.copy_(z)
        self._static_set = True

    def physics_alphas(self) -> dict[str, Tensor]:
        """alpha of every physics block, keyed `blocks.{i}` (detached, for logging and plots)."""
        return {f"blocks.{i}": blk.attn.physics.alpha.detach() for i, blk in enumerate(self.blocks) if blk.attn.physics is not None}

    def _var_ids(self, variables: Sequence[str]) -> list[int]:
        unknown = [v for v in variables if v not in self.in_vars]
        if unknown:
            raise ValueError(f"variables {unknown} are unknown to this model (it knows {self.in_vars}); drop them or rebuild the model with them")
        return [self.in_vars.index(v) for v in variables]

    def _check_order(self, scan_order: Tensor | None, bsz: int, device: torch.device) -> Tensor | None:
        if scan_order is None:
            return None
        n = self.layout.n_tokens
        if scan_order.shape != (bsz, n) or scan_order.is_floating_point():
            raise ValueError(f"scan_order must be an integer tensor of shape ({bsz}, {n}), got {scan_order.dtype} {tuple(scan_order.shape)}")
        order = scan_order.to(device=device, dtype=torch.long)
        if not torch.equal(order.sort(dim=1).values, torch.arange(n, device=device).expand(bsz, n)):
            raise ValueError("scan_order has a row that is not a permutation of 0..L-1: pass the batch's scan_order (sequence slot -> spatial token)")
        return order

    def _fields(self, order: Tensor | None, wind_speed: Tensor | None, bsz: int) -> TokenFields:
        """Per-token side fields, gathered with the same order as the tokens."""
        if not self._static_set:
            raise RuntimeError("physics is enabled but the patch elevation is unset: call net.set_static(static.patch_elevation) first")
        n = self.layout.n_tokens
        if wind_speed is not None:
            if wind_speed.shape != (bsz, n):
                raise ValueError(f"wind_speed must have shape ({bsz}, {n}), got {tuple(wind_speed.shape)}")
            if not torch.isfinite(wind_speed).all():
                raise ValueError("wind_speed has NaN/inf values: check the batch's wind_speed (m/s per patch)")
            wind_speed = to_sequence(wind_speed.to(self.elevation), order)

        def spatial(t: Tensor) -> Tensor:
            return to_sequence(t.expand(bsz, n), order)

        return TokenFields(spatial(self.elevation), wind_speed, spatial(self.token_row), spatial(self.token_col))

    def _aggregate(self, x: Tensor, ids: list[int]) -> Tensor:
        """Per-variable patch embeddings + variable embeddings, cross-attended into one token per patch."""
        tokens = torch.stack([self.token_embeds[i](x[:, c : c + 1]) for c, i in enumerate(ids)], dim=1)  # B,V,L,D
        tokens = tokens + self.var_embed[:, ids].unsqueeze(2)
        bsz, nvar, n, dim = tokens.shape
        tokens = tokens.permute(0, 2, 1, 3).reshape(bsz * n, nvar, dim)
        query = self.var_query.expand(bsz * n, 1, dim)
        out, _ = self.var_agg(query, tokens, tokens, need_weights=False)
        return out.view(bsz, n, dim)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, P*p*p) in spatial order -> (B, P, H, W)."""
        p, (gh, gw) = self.patch_size, self.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, len(self.out_vars))
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], len(self.out_vars), gh * p, gw * p)

    def forward(
        self,
        x: Tensor,
        lead_times: Tensor,
        variables: Sequence[str],
        scan_order: Tensor | None = None,
        wind_speed: Tensor | None = None,
    ) -> Tensor:
        """x (B, V, H, W) normalised, lead_times (B,) hours, scan_order (B, L) or None -> (B, P, H, W)."""
        if x.dim() != 4 or x.shape[1] != len(variables) or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"x must be (B, {len(variables)}, {self.img_size[0]}, {self.img_size[1]}) for variables {list(variables)}, got {tuple(x.shape)}")
        bsz = x.shape[0]
        if lead_times.shape != (bsz,):
            raise ValueError(f"lead_times must have shape ({bsz},) in hours, got {tuple(lead_times.shape)}")
        order = self._check_order(scan_order, bsz, x.device)
        tokens = self._aggregate(x, self._var_ids(variables))
        if self.cfg.scan_pos == "spatial":
            tokens = to_sequence(tokens + self.pos_embed, order)
        else:
            tokens = to_sequence(tokens, order) + self.pos_embed
        lead = lead_times.to(tokens.dtype)
        tokens = tokens + (self.lead_time_embed(lead[:, None] * LEAD_TIME_SCALE) + self.lead_phase_embed(lead_phase(lead)))[:, None]
        fields = self._fields(order, wind_speed, bsz) if self.has_physics else None
        for blk in self.blocks:
            if self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, fields, use_reentrant=False)
            else:
                tokens = blk(tokens, fields)
        tokens = from_sequence(self.norm(tokens), order)
        return self.unpatchify(self.head(tokens))
