"""Skill metrics against hand-computed numpy values, batch-merging and GB 3095 thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.metrics import SkillAccumulator, exceedance_threshold


def test_hand_computed_values() -> None:
    pred = np.array([[80.0, 60.0], [100.0, 10.0]])
    truth = np.array([[70.0, 80.0], [90.0, 20.0]])
    valid = np.array([[True, True], [True, False]])  # the 10/20 cell does not count
    weight = np.array([[2.0], [1.0]])  # row weights (latitude)
    acc = SkillAccumulator(threshold=75.0)
    acc.update(pred, truth, valid, weight)
    r = acc.result()
    # errors on valid cells: +10, -20, +10
    assert r["rmse"] == pytest.approx(math.sqrt((100 + 400 + 100) / 3))
    assert r["mae"] == pytest.approx(40 / 3)
    assert r["bias"] == pytest.approx(0.0)
    assert r["rmse_latw"] == pytest.approx(math.sqrt((2 * 100 + 2 * 400 + 1 * 100) / 5))
    assert r["corr"] == pytest.approx(np.corrcoef([80, 60, 100], [70, 80, 90])[0, 1])
    # exceedance >= 75: obs (F, T, T), forecast (T, F, T): 1 hit, 1 miss, 1 false alarm
    assert (r["csi"], r["pod"], r["far"]) == pytest.approx((1 / 3, 1 / 2, 1 / 2))


def test_undefined_scores_are_none() -> None:
    acc = SkillAccumulator(threshold=None)
    assert all(v is None for v in acc.result().values())
    acc.update(np.ones(4), np.ones(4), np.ones(4, bool), np.ones(4))
    r = acc.result()
    assert r["rmse"] == 0.0 and r["corr"] is None and r["csi"] is None


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_merging_batches_equals_one_pass(n: int, seed: int, parts: int) -> None:
    rng = np.random.default_rng(seed)
    p, t, w = rng.gamma(2, 40, (3, n))
    valid = rng.random(n) < 0.8
    whole = SkillAccumulator(75.0)
    whole.update(p, t, valid, w)
    merged = SkillAccumulator(75.0)
    for idx in np.array_split(np.arange(n), parts):
        piece = SkillAccumulator(75.0)
        piece.update(p[idx], t[idx], valid[idx], w[idx])
        vec = SkillAccumulator(75.0)
        vec.load_vector(piece.as_vector())  # the all-reduce path
        merged.merge(vec)
    a, b = whole.result(), merged.result()
    for key in a:
        assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9)
    if valid.sum() > 1:
        e = p[valid] - t[valid]
        assert a["rmse"] == pytest.approx(np.sqrt(np.mean(e**2)))
        assert a["rmse_latw"] == pytest.approx(np.sqrt(np.sum(w[valid] * e**2) / w[valid].sum()))


def test_gb3095_limits_in_config_units() -> None:
    assert exceedance_threshold("pm25", "ug m-3") == 75
    assert exceedance_threshold("o3", "ug m-3") == 160
    assert exceedance_threshold("co", "mg m-3") == 4
    assert exceedance_threshold("co", "ug m-3") == 4000
    assert exceedance_threshold("so2", "mg m-3") == pytest.approx(0.15)
    assert exceedance_threshold("pm25", "ppb") is None
    assert exceedance_threshold("temp", "K") is None
