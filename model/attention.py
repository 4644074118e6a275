"""Multi-head self-attention with the physics bias, on two backends that never build an N x N bias.

- `sdpa`: the bias is built one query chunk at a time (`chunk_size` rows, O(chunk x N) extra memory)
  and `ChunkedBiasAttention` carries alpha's (and the tables') gradient, which torch's fused kernels
  cannot: with a mask that requires grad they fall back to the math kernel and keep N x N
  probabilities. Forward: per chunk the fused CPU flash kernel with the bias rows as `attn_mask`
  (its op also returns the logsumexp; off CPU the softmax is written out, and `auto` picks flex on
  CUDA anyway), saving only the output and the logsumexp. Backward: one
  pass over (chunk x KEY_TILE) tiles recomputes P = exp(S + bias - lse) and dS = P * (dP - delta)
  and gives dq, dk, dv and the bias gradient (dS summed to the bias' shape) from the same dS.
  Why this pass is hand-written (one block's attention, 8192 tokens, 8 heads of 96, one thread, CPU
  seconds): torch's fused flash backward takes 5.2 s for plain attention; run per 256-row chunk with
  the bias as mask it takes 6.1 s (5.3 s per 1024 rows) and alpha still needs P and dP, another
  2.6 s; the tiled pass here takes 5.8 s for all of it. Tiles of 128 keys keep P and dS in cache (the
  same pass over whole (64 x N) rows took 7.3 s).
- `flex`: FlexAttention with a `score_mod` that reads per-token tensors, O(N) extra memory; compiled
  on CUDA. torch has no FlexAttention backward on CPU, so there it runs eagerly and forward-only.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.attention.flex_attention import flex_attention

from model.physics import PhysicsBias, TokenFields

KEY_TILE = 128  # keys per backward tile (measured: see the module docstring)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Output and logsumexp (B, H, rows) of softmax(q k^T * scale + mask) v for one query chunk."""
    if q.device.type == "cpu":  # fused, and the only public kernel that returns the logsumexp with a float mask
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    out, lse = _attend_explicit(q, k, v, mask, scale)
    return out.to(q.dtype), lse


def _attend_explicit(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The softmax written out in fp32 or wider: the sdpa backend off CPU (on CUDA `auto` picks flex)."""
    q, k, v = (_wide(t) for t in (q, k, v))
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(mask)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(s.sub_(lse[..., None]).exp_(), v), lse


def _wide(t: Tensor) -> Tensor:
    """t in fp32 (fp64 stays fp64), contiguous: the backward accumulates over many tiles in this precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32), memory_format=torch.contiguous_format)


def _chunk_backward(qs: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, bias: Tensor,
                    dk: Tensor, dv: Tensor) -> tuple[Tensor, Tensor]:
    """One query chunk's backward from the saved logsumexp, tile by tile over the keys.

    qs = q * scale, k, v, dout in fp32 (fp64 stays fp64); lse (B, H, rows); delta = rowsum(dO * O)
    (B, H, rows, 1); bias as the forward's mask. Adds the chunk's share to dk and dv; returns dS k
    (dq / scale) and dS summed to the bias' shape.
    """
    dq = torch.zeros_like(qs)
    dbias = torch.empty(bias.shape, dtype=qs.dtype, device=qs.device)
    lse = lse[..., None]
    for t in range(0, k.shape[2], KEY_TILE):
        kt, vt = k[:, :, t : t + KEY_TILE], v[:, :, t : t + KEY_TILE]
        p = torch.matmul(qs, kt.transpose(-1, -2)).add_(bias[..., t : t + KEY_TILE]).sub_(lse).exp_()
        dv[:, :, t : t + KEY_TILE] += torch.matmul(p.transpose(-1, -2), dout)
        ds = p.mul_(torch.matmul(dout, vt.transpose(-1, -2)).sub_(delta))  # dS = P * (dP - delta)
        dq += torch.matmul(ds, kt)
        dk[:, :, t : t + KEY_TILE] += torch.matmul(ds.transpose(-1, -2), qs)
        dbias[..., t : t + KEY_TILE] = ds.sum_to_size(dbias[..., t : t + KEY_TILE].shape)
    return dq, dbias


class ChunkedBiasAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + bias) v with bias rows built per query chunk; O(chunk x N) extra memory.

    Inputs: q, k, v (B, H, N, Dh); the PhysicsBias module; chunk; operand names; operand tensors.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, physics: PhysicsBias, chunk: int, names: tuple[str, ...],
                *tensors: Tensor) -> Tensor:
        ops = dict(zip(names, tensors))
        scale = q.shape[-1] ** -0.5
        parts = [
            _attend(q[:, :, s : s + chunk], k, v, physics.rows(ops, s, s + chunk).to(q.dtype), scale)
            for s in range(0, q.shape[2], chunk)
        ]
        out, lse = (torch.cat(list(t), dim=2) for t in zip(*parts))
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        ctx.physics, ctx.chunk, ctx.names = physics, chunk, names
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        physics, chunk, names = ctx.physics, ctx.chunk, ctx.names
        scale = q.shape[-1] ** -0.5
        qs, kf, vf, dout = _wide(q) * scale, _wide(k), _wide(v), _wide(dout)
        delta = (dout * out.to(dout.dtype)).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(kf), torch.zeros_like(vf)
        need = [i for i in range(len(tensors)) if ctx.needs_input_grad[6 + i]]
        grads: list[Tensor | None] = [None] * len(tensors)
        for s in range(0, q.shape[2], chunk):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(i in need) for i, t in enumerate(tensors)]
                bias = physics.rows(dict(zip(names, leaves)), s, s + chunk)
            rows = slice(s, s + chunk)
            dq[:, :, rows], dbias = _chunk_backward(qs[:, :, rows], kf, vf, dout[:, :, rows], lse[:, :, rows],
                                                    delta[:, :, rows], bias.detach().to(q.dtype), dk, dv)
            if need:
                parts = torch.autograd.grad(bias, [leaves[i] for i in need], dbias.to(bias.dtype))
                for i, g in zip(need, parts):
                    grads[i] = g if grads[i] is None else grads[i] + g
        return (dq.mul_(scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, *grads)


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (fused kernel, bias computed on the fly)."""
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, physics: PhysicsBias, ops: dict[str, Tensor]) -> Tensor:
    ops = {name: t.contiguous() for name, t in ops.items()}

    def score_mod(score, b, h, qi, ki):
        return score + physics.pair(ops, b, h, qi, ki)

    if q.is_cuda:
        return _compiled_flex()(q, k, v, score_mod=score_mod)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *ops.values())):
        raise RuntimeError(
            f"backend='flex' has no backward on CPU in torch {torch.__version__}: use backend='sdpa' "
            "(or 'auto') for training on CPU, or run the flex forward under torch.no_grad()"
        )
    ops = {name: t.detach() for name, t in ops.items()}  # torch refuses CPU inputs that require grad
    with warnings.catch_warnings():  # eager CPU flex is the intended forward-only reference here
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod)


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> flex on CUDA, sdpa elsewhere."""
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


def physics_attention(
    q: Tensor, k: Tensor, v: Tensor, physics: PhysicsBias, fields: TokenFields, backend: str = "auto", chunk_size: int = 256
) -> Tensor:
    """Attention of q, k, v (B, H, N, Dh) with the physics bias of `fields` (sequence order)."""
    ops = physics.operands(fields)
    if resolve_backend(backend, q.device) == "flex":
        return _flex(q, k, v, physics, ops)
    names = tuple(ops)
    return ChunkedBiasAttention.apply(q, k, v, physics, chunk_size, names, *ops.values())


class Attention(nn.Module):
    """timm/ClimaX-named self-attention (`qkv`, `proj`), with the physics bias when `physics` is given."""

    def __init__(self, dim: int, num_heads: int, physics: PhysicsBias | None = None, backend: str = "auto", chunk_size: int = 256):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.physics = physics
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(self, x: Tensor, fields: TokenFields | None = None) -> Tensor:
        bsz, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(bsz, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.physics is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = physics_attention(q, k, v, self.physics, fields, self.backend, self.chunk_size)
        return self.proj(out.transpose(1, 2).reshape(bsz, n, dim))
