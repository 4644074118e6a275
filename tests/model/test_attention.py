"""The chunked sdpa backend equals an unchunked run and a naive softmax; flex forward equals sdpa."""

from __future__ import annotations

import pytest
import torch

from model.attention import physics_attention
from model.config import PhysicsConfig
from model.physics import PhysicsBias, TokenFields

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OPTIONS = [
    {},
    {"form": "multiplicative", "direction": "key_higher", "wind_mod": "local"},
    {"alpha_per_head": True, "rel_pos_bias": True, "num_buckets": 8, "wind_mod": "none"},
]


def setup(opts: dict, seed: int = 0, b: int = 2, h: int = 4, grid=(6, 10), d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    pb = PhysicsBias(PhysicsConfig(**opts), h, 2.0, grid)
    with torch.no_grad():
        for p in pb.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) + (2.0 if p is pb.alpha else 0.0))
    qkv = [torch.randn(b, h, n, d, generator=gen, requires_grad=True) for _ in range(3)]
    idx = torch.arange(n).expand(b, n)
    f = TokenFields(torch.rand(b, n, generator=gen) * 4000, torch.rand(b, n, generator=gen) * 12, idx // grid[1], idx % grid[1])
    return pb, qkv, f


def naive(q, k, v, pb, f):
    """softmax(q k^T / sqrt(d) + full N x N bias) v, written out."""
    bias = pb.rows(pb.operands(f), 0, q.shape[2])
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    return torch.softmax(scores, dim=-1) @ v


def outputs_and_grads(fn, pb, qkv):
    for t in [*qkv, *pb.parameters()]:
        t.grad = None
    out = fn()
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    return [out.detach()] + [t.grad.clone() for t in [*qkv, *pb.parameters()]]


@pytest.mark.parametrize("opts", OPTIONS)
def test_sdpa_chunked_equals_unchunked_equals_naive(opts):
    pb, (q, k, v), f = setup(opts)
    n = q.shape[2]
    ref = outputs_and_grads(lambda: naive(q, k, v, pb, f), pb, (q, k, v))
    for chunk in (7, n, 4 * n):
        got = outputs_and_grads(lambda: physics_attention(q, k, v, pb, f, "sdpa", chunk), pb, (q, k, v))
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert ref[4].abs().sum() > 0  # alpha really has a gradient


@pytest.mark.parametrize("opts", OPTIONS)
def test_flex_forward_equals_sdpa_on_cpu(opts):
    pb, (q, k, v), f = setup(opts, seed=1)
    with torch.no_grad():
        flex = physics_attention(q, k, v, pb, f, "flex")
        sdpa = physics_attention(q, k, v, pb, f, "sdpa", 16)
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-5)


def test_flex_backward_on_cpu_is_a_clear_error():
    pb, (q, k, v), f = setup({})
    with pytest.raises(RuntimeError, match="backend='sdpa'"):
        physics_attention(q, k, v, pb, f, "flex")


def test_auto_is_sdpa_on_cpu_and_trains():
    pb, (q, k, v), f = setup({})
    out = physics_attention(q, k, v, pb, f, "auto", 16)
    out.sum().backward()
    assert torch.isfinite(pb.alpha.grad).all() and pb.alpha.grad.abs().sum() > 0
