"""Multi-head self-attention with the physics bias, on two backends that never build an N x N bias.

- `sdpa`: the bias is built one query chunk at a time and passed as `attn_mask` to
  `F.scaled_dot_product_attention` (a fused kernel on CPU and CUDA). Why a custom backward: when
  the mask requires grad (alpha is learnable) torch falls back to the unfused math kernel and keeps
  every chunk's probabilities for backward, i.e. N x N again. `ChunkedBiasAttention` therefore runs
  the forward without a graph and recomputes each chunk's bias and probabilities in backward, so the
  extra memory is O(chunk x N) in both passes and alpha still gets its gradient.
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


class ChunkedBiasAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + bias) v with bias rows built per query chunk; O(chunk x N) extra memory.

    Inputs: q, k, v (B, H, N, Dh); the PhysicsBias module; chunk; operand names; operand tensors.
    """

    @staticmethod
    def forward(ctx, q, k, v, physics: PhysicsBias, chunk: int, names: tuple[str, ...], *tensors):
        ops = dict(zip(names, tensors))
        n = q.shape[2]
        with torch.no_grad():
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(q[:, :, s : s + chunk], k, v, attn_mask=physics.rows(ops, s, s + chunk).to(q.dtype))
                    for s in range(0, n, chunk)
                ],
                dim=2,
            )
        ctx.save_for_backward(q, k, v, out, *tensors)
        ctx.physics, ctx.chunk, ctx.names = physics, chunk, names
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, *tensors = ctx.saved_tensors
        physics, chunk, names = ctx.physics, ctx.chunk, ctx.names
        n, scale = q.shape[2], q.shape[-1] ** -0.5
        kf, vf, dout = k.float(), v.float(), dout.float()
        delta = (dout * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        need = [i for i in range(len(tensors)) if ctx.needs_input_grad[6 + i]]
        grads: list[Tensor | None] = [None] * len(tensors)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(i in need) for i, t in enumerate(tensors)]
                bias = physics.rows(dict(zip(names, leaves)), s, e)
            qc, doc = q[:, :, s:e].float(), dout[:, :, s:e]
            p = torch.matmul(qc, kf.transpose(-1, -2)).mul_(scale).add_(bias.detach())
            p = p.sub_(p.amax(dim=-1, keepdim=True)).exp_()
            p = p.div_(p.sum(dim=-1, keepdim=True))  # softmax in place: one (chunk x N) buffer per head
            dv += torch.matmul(p.transpose(-1, -2), doc)
            ds = p.mul_(torch.matmul(doc, vf.transpose(-1, -2)).sub_(delta[:, :, s:e]))  # dS = P * (dP - delta)
            dq[:, :, s:e] = torch.matmul(ds, kf) * scale
            dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
            if need:
                parts = torch.autograd.grad(bias, [leaves[i] for i in need], ds.sum_to_size(bias.shape))
                for i, g in zip(need, parts):
                    grads[i] = g if grads[i] is None else grads[i] + g
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, *grads)


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
