"""The sdpa backend (fused forward, tiled backward) against a float64 softmax written out; flex forward equals sdpa.

Tolerances: float32 runs must equal the float64 reference elementwise to |got - ref| <= 1e-5 + 1e-5 * |ref|
(torch.testing.assert_close with rtol = atol = 1e-5), for the output and the gradients of q, k, v, alpha
and the relative-position tables.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import attention
from model.attention import physics_attention
from model.config import PhysicsConfig
from model.physics import PhysicsBias, TokenFields

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OPTIONS = [
    {},
    {"form": "multiplicative", "direction": "key_higher", "wind_mod": "local"},
    {"alpha_per_head": True, "rel_pos_bias": True, "num_buckets": 8, "wind_mod": "none"},
]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def setup(opts: dict, seed: int = 0, b: int = 2, h: int = 4, grid=(6, 10), d: int = 8, alpha_shift: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    pb = PhysicsBias(PhysicsConfig(**opts), h, 2.0, grid)
    with torch.no_grad():
        for p in pb.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) + (alpha_shift if p is pb.alpha else 0.0))
    qkv = [torch.randn(b, h, n, d, generator=gen, requires_grad=True) for _ in range(3)]
    idx = torch.arange(n).expand(b, n)
    f = TokenFields(torch.rand(b, n, generator=gen) * 4000, torch.rand(b, n, generator=gen) * 12, idx // grid[1], idx % grid[1])
    return pb, qkv, f


def loss(out: torch.Tensor) -> torch.Tensor:
    """A loss whose dO differs from element to element (a plain sum would give rowsum(dO * O) structure)."""
    return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum()


def reference(pb: PhysicsBias, qkv, f: TokenFields) -> list[torch.Tensor]:
    """Output and gradients (q, k, v, then pb's parameters) of softmax(q k^T / sqrt(d) + full N x N bias) v,
    written out in float64 and differentiated by autograd."""
    pb64 = copy.deepcopy(pb).double()
    f64 = TokenFields(f.elevation.double(), f.wind_speed.double(), f.row, f.col)
    q, k, v = (t.detach().double().requires_grad_() for t in qkv)
    bias = pb64.rows(pb64.operands(f64), 0, q.shape[2])
    out = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1) @ v
    wrt = [q, k, v, *(p for p in pb64.parameters() if p.requires_grad)]
    return [out.detach(), *torch.autograd.grad(loss(out), wrt)]


def sdpa(pb: PhysicsBias, qkv, f: TokenFields, chunk: int) -> list[torch.Tensor]:
    """Output and gradients, in the order of `reference`, of the sdpa backend."""
    out = physics_attention(*qkv, pb, f, "sdpa", chunk)
    wrt = [*qkv, *(p for p in pb.parameters() if p.requires_grad)]
    return [out.detach(), *torch.autograd.grad(loss(out), wrt)]


def assert_matches_reference(got: list[torch.Tensor], ref: list[torch.Tensor], **tol) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, **(tol or TOL))


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("tile", [5, attention.KEY_TILE])
def test_sdpa_equals_float64_reference(opts, tile):
    pb, qkv, f = setup(opts)
    n = qkv[0].shape[2]
    ref = reference(pb, qkv, f)
    with mock.patch.object(attention, "KEY_TILE", tile):
        for chunk in (7, n, 4 * n):
            assert_matches_reference(sdpa(pb, qkv, f, chunk), ref)
    assert ref[4].abs().sum() > 1e-3  # alpha really has a gradient


@pytest.mark.parametrize("opts", OPTIONS)
def test_sdpa_in_float64_is_the_reference_formula(opts):
    """In float64 (the CPU flash kernel runs it too) only rounding separates the paths: the formulas agree."""
    pb, qkv, f = setup(opts, seed=3)
    ref = reference(pb, qkv, f)
    pb64 = copy.deepcopy(pb).double()
    f64 = TokenFields(f.elevation.double(), f.wind_speed.double(), f.row, f.col)
    qkv64 = [t.detach().double().requires_grad_() for t in qkv]
    with mock.patch.object(attention, "KEY_TILE", 16):
        assert_matches_reference(sdpa(pb64, qkv64, f64, 9), ref, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    grid=st.tuples(st.integers(1, 5), st.integers(1, 9)),
    d=st.sampled_from([1, 4, 16]),
    chunk=st.integers(1, 50),
    tile=st.integers(1, 50),
    form=st.sampled_from(["additive", "multiplicative"]),
    direction=st.sampled_from(["uphill", "key_higher"]),
    wind_mod=st.sampled_from(["none", "global", "local"]),
    per_head=st.booleans(),
    rel_pos=st.booleans(),
    alpha_shift=st.sampled_from([0.0, 2.0, 40.0]),  # 40: most uphill pairs hit the clamp (zero gradient there)
    frozen=st.booleans(),
)
def test_sdpa_gradients_property(seed, b, h, grid, d, chunk, tile, form, direction, wind_mod, per_head, rel_pos, alpha_shift, frozen):
    """Any shape, chunk and key tile (ragged last ones included), any bias option, alpha frozen or learnt."""
    opts = {"form": form, "direction": direction, "wind_mod": wind_mod, "alpha_per_head": per_head,
            "rel_pos_bias": rel_pos, "num_buckets": 4}
    pb, qkv, f = setup(opts, seed, b, h, grid, d, alpha_shift)
    pb.alpha.requires_grad_(not frozen)
    ref = reference(pb, qkv, f)
    with mock.patch.object(attention, "KEY_TILE", tile):
        assert_matches_reference(sdpa(pb, qkv, f, chunk), ref)


def test_explicit_softmax_equals_the_fused_kernel():
    """`_attend_explicit` (the path off CPU) agrees with the CPU flash kernel on output and logsumexp."""
    pb, (q, k, v), f = setup(OPTIONS[2], seed=2)
    with torch.no_grad():
        mask = pb.rows(pb.operands(f), 3, 40)
        fused = attention._attend(q[:, :, 3:40], k, v, mask, 0.3)
        explicit = attention._attend_explicit(q[:, :, 3:40], k, v, mask, 0.3)
    for got, want in zip(explicit, fused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_stays_within_its_rounding_of_the_reference():
    """bf16 q, k, v: the fused bf16 forward and the fp32 backward stay within bf16 rounding of the reference."""
    pb, qkv, f = setup({}, seed=4)
    ref = reference(pb, qkv, f)
    got = sdpa(pb, [t.detach().bfloat16().requires_grad_() for t in qkv], f, 16)
    assert [g.dtype for g in got[:4]] == [torch.bfloat16] * 4
    assert_matches_reference(got, ref, rtol=5e-2, atol=5e-2)


def largest_allocation(fn) -> int:
    """Bytes of the largest tensor any single op allocated (and kept) while fn ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_extra_memory_is_chunk_by_n():
    """No op in forward or backward allocates near one N x N score matrix (B = 1, 2 heads, N = 1024)."""
    pb, qkv, f = setup({}, b=1, h=2, grid=(16, 64), d=16)
    n, chunk = qkv[0].shape[2], 32
    bound = 2 * chunk * n * 4  # a sixteenth of one head's N x N in fp32
    assert 0 < largest_allocation(lambda: sdpa(pb, qkv, f, chunk)) <= bound
    assert largest_allocation(lambda: reference(pb, qkv, f)) > bound  # the check does see N x N


@pytest.mark.parametrize("opts", OPTIONS)
def test_flex_forward_equals_sdpa_on_cpu(opts):
    pb, (q, k, v), f = setup(opts, seed=1)
    with torch.no_grad():
        flex = physics_attention(q, k, v, pb, f, "flex")
        sdpa_out = physics_attention(q, k, v, pb, f, "sdpa", 16)
    torch.testing.assert_close(flex, sdpa_out, rtol=1e-4, atol=1e-5)


def test_flex_backward_on_cpu_is_a_clear_error():
    pb, (q, k, v), f = setup({})
    with pytest.raises(RuntimeError, match="backend='sdpa'"):
        physics_attention(q, k, v, pb, f, "flex")


def test_auto_is_sdpa_on_cpu_and_trains():
    pb, (q, k, v), f = setup({})
    out = physics_attention(q, k, v, pb, f, "auto", 16)
    out.sum().backward()
    assert torch.isfinite(pb.alpha.grad).all() and pb.alpha.grad.abs().sum() > 0
