"""Physics bias formula against a direct numpy evaluation, and its sign conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import PhysicsConfig
from model.physics import PhysicsBias, TokenFields, t5_bucket

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def numpy_bias(z, w, alpha, cfg: PhysicsConfig) -> np.ndarray:
    """(B, H, N, N) bias written straight from DESIGN.md, independent of model.physics."""
    z = z / cfg.z0
    zi, zj = z[:, None, :, None], z[:, None, None, :]
    d = zi - zj if cfg.direction == "uphill" else zj - zi
    if cfg.wind_mod == "none":
        m = np.ones_like(d)
    elif cfg.wind_mod == "global":
        m = (1 - 0.5 / (1 + np.exp(-(w.mean(axis=1) - 5))))[:, None, None, None]
    else:
        pair = 0.5 * (w[:, None, :, None] + w[:, None, None, :])
        m = 1 - 0.5 / (1 + np.exp(-(pair - 5)))
    s = alpha[None, :, None, None] * m
    bias = -s * np.maximum(d, 0) if cfg.form == "additive" else -np.log1p(np.exp(s * d))
    return np.clip(bias, -cfg.clamp, 0)


def fields(z: np.ndarray, w: np.ndarray) -> TokenFields:
    b, n = z.shape
    idx = torch.arange(n).expand(b, n)
    return TokenFields(torch.tensor(z, dtype=torch.float32), torch.tensor(w, dtype=torch.float32), idx // 4, idx % 4)


@settings(max_examples=40, deadline=None)
@given(
    form=st.sampled_from(["additive", "multiplicative"]),
    direction=st.sampled_from(["uphill", "key_higher"]),
    wind_mod=st.sampled_from(["none", "global", "local"]),
    per_head=st.booleans(),
    clamp=st.sampled_from([0.5, 3.0, 10.0]),
    alpha=st.floats(-3.0, 8.0),
    seed=st.integers(0, 2**16),
)
def test_bias_matches_numpy(form, direction, wind_mod, per_head, clamp, alpha, seed):
    cfg = PhysicsConfig(form=form, direction=direction, wind_mod=wind_mod, alpha_per_head=per_head, clamp=clamp)
    rng = np.random.default_rng(seed)
    heads, n = 3, 12
    z = rng.uniform(-100, 5000, size=(2, n))
    w = rng.uniform(0, 15, size=(2, n))
    pb = PhysicsBias(cfg, heads, alpha, (3, 4))
    if per_head:
        with torch.no_grad():
            pb.alpha.copy_(torch.tensor([alpha, alpha / 2, -alpha]))
    got = pb.rows(pb.operands(fields(z, w)), 0, n).detach().double().numpy()
    want = numpy_bias(z, w, pb.alpha.detach().double().numpy().repeat(heads // pb.alpha.numel()), cfg)
    np.testing.assert_allclose(np.broadcast_to(got, want.shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["additive", "multiplicative"])
def test_uphill_penalised_downhill_not_and_key_higher_mirrors(form):
    z = np.array([[0.0, 2000.0]])  # token 0 low, token 1 high
    w = np.zeros((1, 2))
    up = PhysicsBias(PhysicsConfig(form=form, wind_mod="none"), 1, 2.0, (1, 2))
    kh = PhysicsBias(PhysicsConfig(form=form, wind_mod="none", direction="key_higher"), 1, 2.0, (1, 2))
    b_up = up.rows(up.operands(fields(z, w)), 0, 2)[0, 0].detach()
    b_kh = kh.rows(kh.operands(fields(z, w)), 0, 2)[0, 0].detach()
    # query 1 (high) receiving from key 0 (low) is uphill transport: penalised
    assert b_up[1, 0] < b_up[0, 1] <= 0
    assert b_up[1, 0] == pytest.approx(-4.0 if form == "additive" else float(np.log(1 / (1 + np.exp(4.0)))), rel=1e-5)
    if form == "additive":
        assert b_up[0, 1] == 0.0 and b_up[0, 0] == 0.0
    torch.testing.assert_close(b_kh, b_up.T)


def test_clamp_applies_to_bias_values():
    z = np.array([[0.0, 9000.0]])
    pb = PhysicsBias(PhysicsConfig(wind_mod="none", clamp=10.0), 1, 50.0, (1, 2))
    bias = pb.rows(pb.operands(fields(z, np.zeros((1, 2)))), 0, 2)
    assert bias.min().item() == -10.0 and bias.max().item() == 0.0
    assert pb.alpha.item() == 50.0  # alpha itself is not clamped


def test_strong_wind_halves_the_barrier_at_most():
    z = np.array([[0.0, 1000.0]])
    pb = PhysicsBias(PhysicsConfig(wind_mod="global"), 1, 2.0, (1, 2))
    calm = pb.rows(pb.operands(fields(z, np.zeros((1, 2)))), 0, 2)[0, 0, 1, 0].item()
    gale = pb.rows(pb.operands(fields(z, np.full((1, 2), 100.0))), 0, 2)[0, 0, 1, 0].item()
    assert calm == pytest.approx(-2.0 * (1 - 0.5 / (1 + np.exp(5))), rel=1e-5)
    assert gale == pytest.approx(-1.0, rel=1e-5)


def test_t5_bucket_exact_near_log_far_and_signed():
    delta = torch.arange(-40, 41)
    b = t5_bucket(delta, 16, 40)
    assert b.min() >= 0 and b.max() <= 15
    assert torch.equal(b[40:44], torch.tensor([0, 9, 10, 11]))  # 0..3 exact: 0, +1, +2, +3
    assert torch.equal(b[37:40], torch.tensor([3, 2, 1]))  # -3, -2, -1
    pos = b[41:]
    assert torch.all(pos[1:] >= pos[:-1])  # monotone in distance
