"""errors.npz: per-time lat-weighted squared errors, by hand on a 2x2 grid, round-tripped through the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.time_errors import TimeErrors, load_time_mse


def test_per_time_mse_by_hand(tmp_path: Path) -> None:
    errors = TimeErrors(["pm25"], [6, 12])
    truth = np.zeros((2, 1, 2, 2))
    pred = np.array([[[[1.0, 2.0], [3.0, np.nan]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    mask = np.array([[[[True, True], [True, False]]], [[[False, False], [False, False]]]])
    lat_w = np.array([[0.5], [1.5]])  # (H, 1)
    valid = np.array([True, False])  # the second sample is padding
    errors.update(["2018-01-05T00:00", "pad"], valid, 0, pred, truth, mask, lat_w)
    errors.update(["2018-01-05T00:00", "pad"], valid, 1, pred, truth, np.zeros_like(mask), lat_w)
    errors.save(tmp_path / "errors.npz")
    got = load_time_mse(tmp_path / "errors.npz")
    assert got.times.tolist() == ["2018-01-05T00:00"] and got.targets == ["pm25"] and got.leads_h == ["6", "12"]
    # lead 6: (0.5 * 1 + 0.5 * 4 + 1.5 * 9) / (0.5 + 0.5 + 1.5); lead 12 has no valid cell
    assert np.isclose(got.mse[0, 0, 0], 16.0 / 2.5) and np.isnan(got.mse[0, 0, 1])
