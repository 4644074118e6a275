"""The Diebold-Mariano test of `train.significance`: identical arms, a large shift, the null's size under
strong autocorrelation (and what a naive t-test would do there), and symmetry in the two arms."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from train.significance import diebold_mariano


def ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """A stationary AR(1) series (burn-in dropped)."""
    e = rng.standard_normal(n + 100)
    x = np.zeros_like(e)
    for t in range(1, e.size):
        x[t] = phi * x[t - 1] + e[t]
    return x[100:]


seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, n=st.integers(3, 300))
@settings(max_examples=30, deadline=None)
def test_identical_arms_give_p_one(seed: int, n: int) -> None:
    loss = np.random.default_rng(seed).gamma(2.0, size=n)
    res = diebold_mariano(loss, loss.copy())
    assert res.mean_diff == 0.0 and res.statistic == 0.0 and res.p_value == 1.0 and res.n == n


@given(seed=seeds)
@settings(max_examples=20, deadline=None)
def test_large_shift_in_autocorrelated_noise_is_significant(seed: int) -> None:
    rng = np.random.default_rng(seed)
    control = 10.0 + ar1(rng, 200, 0.7)
    variant = control - 2.0 + 0.5 * ar1(rng, 200, 0.7)  # d = 2 + noise of sd 0.7
    res = diebold_mariano(control, variant)
    assert res.p_value < 0.01 and res.statistic > 0 and res.mean_diff > 0


@given(seed=seeds, phi=st.floats(0.0, 0.9), shift=st.floats(-1.0, 1.0))
@settings(max_examples=30, deadline=None)
def test_swapping_the_arms_flips_the_sign_not_the_p_value(seed: int, phi: float, shift: float) -> None:
    rng = np.random.default_rng(seed)
    a, b = ar1(rng, 120, phi), ar1(rng, 120, phi) + shift
    ab, ba = diebold_mariano(a, b), diebold_mariano(b, a)
    assert math.isclose(ab.statistic, -ba.statistic, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(ab.p_value, ba.p_value, rel_tol=1e-12, abs_tol=1e-15)
    assert 0.0 <= ab.p_value <= 1.0


def test_null_size_under_strong_autocorrelation_is_near_nominal() -> None:
    """AR(1) differentials with rho 0.8 and no true difference, 1000 replicates of 200 times: the HAC test
    rejects at about the nominal 5%, the naive paired t-test about half the time."""
    rng = np.random.default_rng(2024)
    reps, n, zeros = 1000, 200, np.zeros(200)
    dm = naive = 0
    for _ in range(reps):
        d = ar1(rng, n, 0.8)
        dm += diebold_mariano(d, zeros).p_value < 0.05
        naive += stats.ttest_rel(d, zeros).pvalue < 0.05
    assert 0.02 <= dm / reps <= 0.10, dm / reps
    assert naive / reps > 0.35 and naive > 4 * dm, (naive / reps, dm / reps)


def test_short_or_degenerate_series() -> None:
    assert math.isnan(diebold_mariano(np.ones(2), np.zeros(2)).p_value)  # too short to test
    res = diebold_mariano(np.full(50, 2.0), np.ones(50))  # a constant, nonzero differential
    assert res.p_value == 0.0 and res.statistic == math.inf
