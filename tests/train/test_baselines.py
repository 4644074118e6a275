"""The baselines of `train.baselines` against hand-computed cases on tiny synthetic fields."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from train.baselines import BASELINES, EARTH_RADIUS_M, Climatology, StoreTargets, advect, diurnal_lag_h
from train.config import load_experiment_config
from train.metrics import METRIC_NAMES
from train.report import skill_score

LEAD_H = 6.0
SECONDS = LEAD_H * 3600.0
CELL_M = EARTH_RADIUS_M * math.radians(1.0)  # one degree of latitude in metres


def _blob(h: int = 5, w: int = 6) -> torch.Tensor:
    field = torch.zeros(1, 1, h, w)
    field[0, 0, 2, 3] = 1.0
    return field


def test_advection_moves_a_blob_one_cell_north() -> None:
    field = _blob()
    lat = torch.arange(30.0, 35.0)
    v = torch.full((1, 5, 6), CELL_M / SECONDS)  # exactly one cell (1 degree) north over the lead
    moved = advect(field, torch.zeros_like(v), v, lat, (1.0, 1.0), LEAD_H)
    expected = torch.zeros_like(field)
    expected[0, 0, 3, 3] = 1.0  # blob one row north
    expected[0, 0, 0] = field[0, 0, 0]  # row 0's departure point is south of the domain: persistence (zeros)
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)


def test_advection_uses_cos_latitude_for_longitude() -> None:
    field = _blob()
    lat = torch.arange(30.0, 35.0)
    # one cell east on every row: the wind shrinks with cos(lat) as the meridians converge
    u = (CELL_M * torch.cos(torch.deg2rad(lat)) / SECONDS)[:, None].expand(5, 6)[None].clone()
    moved = advect(field, u, torch.zeros_like(u), lat, (1.0, 1.0), LEAD_H)
    assert moved[0, 0, 2, 4].item() == pytest.approx(1.0, abs=1e-5)
    assert moved[0, 0, 2, 3].item() == pytest.approx(0.0, abs=1e-5)
    assert moved.sum().item() == pytest.approx(1.0, abs=1e-5)
    # the same wind at the equator's cell size would move it less than one cell: cos(lat) matters
    at_equator = advect(field, u, torch.zeros_like(u), torch.zeros(5), (1.0, 1.0), LEAD_H)
    share = math.cos(math.radians(32.0))  # u / (cell at the equator) = cos(32 deg) cells
    assert at_equator[0, 0, 2, 4].item() == pytest.approx(share, abs=1e-5)
    assert at_equator[0, 0, 2, 3].item() == pytest.approx(1 - share, abs=1e-5)


def test_advection_interpolates_bilinearly_and_keeps_persistence_where_departure_leaves() -> None:
    field = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4 * row + col
    lat = torch.tensor([0.0, 1.0, 2.0])
    u = torch.full((1, 3, 4), -0.5 * CELL_M / SECONDS)  # half a cell WEST: departure x + 0.5 (at the equator row)
    v = torch.full((1, 3, 4), 0.5 * CELL_M / SECONDS)  # half a cell north: departure y - 0.5
    moved = advect(field, u, v, lat, (1.0, 1.0), LEAD_H)
    # row 1, col 1 at lat 1 deg: departure (y, x) = (0.5, 1 + 0.5 / cos(1 deg)); linear field -> exact value
    dx = 0.5 / math.cos(math.radians(1.0))
    assert moved[0, 0, 1, 1].item() == pytest.approx(4 * 0.5 + 1 + dx, abs=1e-4)
    assert torch.equal(moved[0, 0, 0], field[0, 0, 0])  # departure south of row 0
    assert torch.equal(moved[0, 0, :, 3], field[0, 0, :, 3])  # departure east of the last column


def _hourly_fields(times: np.ndarray, value: np.ndarray) -> xr.DataArray:
    data = np.broadcast_to(value[:, None, None, None], (len(times), 1, 2, 3)).astype(np.float32).copy()
    data[:, 0, 1, 2] += 100.0  # one cell offset: climatology is per cell
    return xr.DataArray(data, dims=("time", "var", "lat", "lon"), coords={"time": times, "var": ["pm25"]})


def test_climatology_is_the_mean_by_month_and_hour() -> None:
    times = np.arange(np.datetime64("2018-01-01T00"), np.datetime64("2018-03-01T00"), np.timedelta64(6, "h"))
    month = times.astype("datetime64[M]").astype(int) % 12 + 1
    hour = (times - times.astype("datetime64[D]")).astype("timedelta64[h]").astype(int)
    day = (times.astype("datetime64[D]") - times.astype("datetime64[M]")).astype(int)
    wiggle = np.where(day % 2 == 0, 1.0, -1.0)  # averages out over an even number of days per (month, hour)
    fields = _hourly_fields(times, 10.0 * month + hour + wiggle)
    fields[5] = np.nan  # an invalid time (2018-01-02T06) counts in no mean
    days_jan = np.arange(31)
    jan06 = 10 + 6 + np.mean(np.where(days_jan[days_jan != 1] % 2 == 0, 1.0, -1.0))  # Jan, 06 h, without day 2

    clim = Climatology.from_fields(fields)
    assert clim.months() == [1, 2]
    valid = np.array(["2019-02-10T12", "2019-01-20T06", "2019-03-05T18", "NaT"], dtype="datetime64[ns]")
    got = clim.forecast(valid)
    assert got.shape == (4, 1, 2, 3)
    assert got[0, 0, 0, 0] == pytest.approx(20 + 12)  # Feb (28 days: wiggle cancels), 12 h
    assert got[0, 0, 1, 2] == pytest.approx(20 + 12 + 100)
    assert got[1, 0, 0, 0] == pytest.approx(jan06)
    # March is not in the train period: the hour-of-day mean over Jan and Feb (31 + 28 days, one NaN) at 18 h
    jan18 = 10 + 18 + np.mean(np.where(days_jan % 2 == 0, 1.0, -1.0))
    assert got[2, 0, 0, 0] == pytest.approx((jan18 * 31 + (20 + 18) * 28) / 59)
    assert np.isnan(got[3]).all()


def test_store_targets_read_by_time_with_gaps_as_nan() -> None:
    times = np.arange(np.datetime64("2018-01-01T00"), np.datetime64("2018-01-03T00"), np.timedelta64(3, "h"))
    fields = _hourly_fields(times, np.arange(len(times), dtype=np.float64))
    ds = xr.Dataset({"fields": fields, "valid": ("time", np.arange(len(times)) != 4)})
    history = StoreTargets(ds, ["pm25"])
    asked = np.array(["2018-01-01T09", "2018-01-01T12", "2017-12-31T21", "2018-01-02T21", "2018-01-01T09",
                      "2018-01-01T10", "NaT"], dtype="datetime64[ns]")
    got = history.at(asked)[:, 0, 0, 0]
    np.testing.assert_array_equal(got[[0, 3, 4]], [3.0, 15.0, 3.0])  # a time read twice in one batch is fine
    assert np.isnan(got[[1, 2, 5, 6]]).all()  # invalid (index 4), before the store, off the time step, NaT


@pytest.mark.parametrize(("lead_h", "lag_h"), [(3, 24), (12, 24), (24, 24), (25, 48), (48, 48), (96, 96)])
def test_diurnal_persistence_looks_back_whole_days_never_after_the_input_time(lead_h: int, lag_h: int) -> None:
    assert diurnal_lag_h(lead_h) == lag_h
    assert lead_h - diurnal_lag_h(lead_h) <= 0  # the source time t + lead - lag is not after t


def test_skill_score_against_a_reference() -> None:
    assert skill_score(1.0, 2.0) == pytest.approx(0.5)
    assert skill_score(3.0, 2.0) == pytest.approx(-0.5)
    assert skill_score(2.0, 2.0) == 0.0
    assert skill_score(None, 2.0) is None and skill_score(1.0, 0.0) is None


def _rmse(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean(((pred - truth)[:, mask]) ** 2)))


@pytest.mark.slow
def test_evaluate_scores_the_baselines_like_the_store_says(evaluated_run: Path) -> None:
    config = evaluated_run
    report = config.parent / "run" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    cfg = load_experiment_config(config)
    for source in BASELINES:
        assert list(metrics[source]) == cfg.data.targets
        for by_lead in metrics[source].values():
            assert list(by_lead) == ["3", "6", "12"]
            for scores in by_lead.values():
                assert tuple(scores) == METRIC_NAMES
                assert all(math.isfinite(scores[k]) for k in ("rmse", "mae", "bias", "corr", "rmse_latw"))

    # the same forecasts straight from the store: test times t with t + lead in the test split, loss mask
    ds = xr.open_zarr(cfg.data.store)
    time = ds["time"].values
    test = np.flatnonzero((time >= np.datetime64(cfg.data.splits["test"].start))
                          & (time <= np.datetime64(cfg.data.splits["test"].end)))
    train = time <= np.datetime64(cfg.data.splits["train"].end)
    fields = ds["fields"].sel(var=["pm25", "u", "v"]).values.astype(np.float64)
    pm25, mask = fields[:, 0], ds["loss_mask"].values
    hours = (time - time.astype("datetime64[D]")).astype("timedelta64[h]").astype(int)
    clim = {h: pm25[train & (hours == h)].mean(axis=0) for h in set(hours)}  # all of the tiny store is January
    for lead, steps in (("3", 1), ("12", 4)):
        t, v = test[:-steps], test[steps:]
        truth = pm25[v]
        got = metrics["climatology"]["pm25"][lead]["rmse"]
        assert got == pytest.approx(_rmse(np.stack([clim[h] for h in hours[v]]), truth, mask), rel=1e-4)
        got = metrics["diurnal_persistence"]["pm25"][lead]["rmse"]
        assert got == pytest.approx(_rmse(pm25[v - 8], truth, mask), rel=1e-4)  # 8 steps of 3 h = 24 h back
        moved = advect(torch.as_tensor(pm25[t, None]), torch.as_tensor(fields[t, 1]), torch.as_tensor(fields[t, 2]),
                       torch.tensor(ds["lat"].values), (1.0, 1.0), float(lead)).numpy()[:, 0]
        assert metrics["advection"]["pm25"][lead]["rmse"] == pytest.approx(_rmse(moved, truth, mask), rel=1e-4)
        assert metrics["advection"]["pm25"][lead]["rmse"] != metrics["persistence"]["pm25"][lead]["rmse"]

    text = (report / "report.md").read_text()
    assert "| SS vs persistence | SS vs climatology |" in text
    assert "| 3 | persistence |" in text and "| 3 | diurnal_persistence |" in text and "| 12 | advection |" in text
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.split("## pm25")[1].split("## ")[0].splitlines() if line.startswith("| 3 |")}
    pm25_3 = {source: metrics[source]["pm25"]["3"]["rmse"] for source in ("model", "persistence", "climatology")}
    assert rows["model"][-2:] == [f"{skill_score(pm25_3['model'], pm25_3[ref]):.3f}"
                                  for ref in ("persistence", "climatology")]
    assert rows["persistence"][-2] == "0.000" and rows["climatology"][-1] == "0.000"
