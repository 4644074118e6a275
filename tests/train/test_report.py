"""The report a scientist expects: Taylor statistics, time-mean error maps, the coastline, thresholds and
the n/a note, labelled axes and titles that do not overlap, end to end on the tiny fixtures."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import train.report as report_module
from train.metrics import ErrorMaps, SkillAccumulator
from train.report import NA_NOTE, Grid, markdown_report, plot_error_maps, taylor_stats


def test_taylor_statistics_by_hand() -> None:
    pred = np.array([1.0, 3.0, 2.0, 6.0])
    truth = np.array([2.0, 2.0, 4.0, 4.0])
    acc = SkillAccumulator(threshold=None)
    acc.update(pred, truth, np.ones(4, bool), np.ones(4))
    scores = acc.result()
    s_f, s_r = np.std(pred), np.std(truth)  # population std: 1.8708, 1.0
    r = np.corrcoef(pred, truth)[0, 1]
    assert scores["std_pred"] == pytest.approx(s_f) and scores["std_truth"] == pytest.approx(s_r)
    ratio, corr, crms = taylor_stats(scores)
    assert ratio == pytest.approx(s_f / s_r) and corr == pytest.approx(r)
    centred = np.sqrt(np.mean(((pred - pred.mean()) - (truth - truth.mean())) ** 2))  # E' from the data
    assert crms * s_r == pytest.approx(centred)
    assert centred**2 == pytest.approx(s_f**2 + s_r**2 - 2 * s_f * s_r * r)  # Taylor 2001, eq. 2
    assert scores["rmse"] ** 2 == pytest.approx(scores["bias"] ** 2 + centred**2)
    assert taylor_stats({"std_pred": 1.0, "std_truth": 0.0, "corr": None}) is None


def test_error_maps_on_a_hand_field() -> None:
    maps = ErrorMaps(("model", "persistence"), (1, 2, 2))
    truth = np.zeros((2, 2, 2))
    pred = np.array([[[1.0, 2.0], [0.0, 5.0]], [[3.0, -2.0], [0.0, 7.0]]])
    valid = np.array([[[True, True], [False, True]], [[True, True], [False, False]]])
    maps.update("model", 0, pred, truth, valid)
    bias, rmse = maps.result("model")
    np.testing.assert_allclose(bias[0], [[2.0, 0.0], [np.nan, 5.0]])
    np.testing.assert_allclose(rmse[0], [[math.sqrt(5), 2.0], [np.nan, 5.0]])
    assert np.isnan(maps.result("persistence")[0]).all()
    merged = ErrorMaps(("model", "persistence"), (1, 2, 2))
    merged.load_vector(maps.as_vector() * 2)  # as after an all-reduce over two identical ranks
    np.testing.assert_allclose(merged.result("model")[1], rmse)


def _tiny_metrics(names: list[str], units: dict[str, str]) -> dict:
    row = {"rmse": 2.0, "mae": 1.0, "bias": 0.5, "corr": 0.8, "rmse_latw": 2.0, "csi": None, "pod": None,
           "far": None, "std_pred": 1.0, "std_truth": 1.2}
    return {"model": {n: {"3": row} for n in names}, "persistence": {n: {"3": row} for n in names}, "units": units}


def test_report_states_thresholds_and_explains_na() -> None:
    text = markdown_report(_tiny_metrics(["pm25", "co", "o3"], {"pm25": "ug m-3", "co": "mg m-3", "o3": "ug m-3"}),
                           {}, [])
    assert "exceedance = value >= 75 ug m-3 (GB 3095-2012 grade II 24-h limit" in text
    assert "exceedance = value >= 4 mg m-3" in text
    assert "exceedance = value >= 160 ug m-3 (GB 3095-2012 grade II 8-h limit" in text
    assert text.count(NA_NOTE) == 3 and "n/a = no exceedance in the split" in NA_NOTE
    assert "SS vs persistence" in text


def test_error_map_has_lat_lon_and_coastline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = _capture(monkeypatch)
    lat, lon = np.linspace(20, 30, 4), np.linspace(100, 115, 6)
    land = np.zeros((4, 6), bool)
    land[:, :4] = True
    field = np.arange(24.0).reshape(1, 4, 6)
    path = plot_error_maps({"model": (field, field), "persistence": (-field, field)}, {"pm25": "persistence"},
                           Grid(lat, lon, land), ["pm25"], {"pm25": "ug m-3"}, "t", tmp_path / "e.png")
    assert path.is_file()
    maps = [ax for ax in figures[0].axes if ax.images]
    assert len(maps) == 4
    for ax in maps:
        assert ax.get_xlabel() == "longitude (\u00b0E)" and ax.get_ylabel() == "latitude (\u00b0N)"
        assert _coastline(ax)


def _coastline(ax) -> bool:
    """The land/sea contour: a contour set with at least one drawn path."""
    from matplotlib.contour import ContourSet

    return any(isinstance(c, ContourSet) and any(len(p.vertices) for p in c.get_paths()) for c in ax.collections)


def _capture(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every figure `_save` writes, before it is closed."""
    figures: list = []
    save = report_module._save

    def keep(fig, path: Path) -> Path:
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(report_module, "_save", keep)
    return figures


def _check_labels_and_layout(fig) -> None:
    """Every axes says what it shows; map axes are in degrees; titles and labels do not overlap."""
    for ax in fig.axes:
        assert ax.get_xlabel() or ax.get_ylabel(), f"unlabelled axes in {fig.get_suptitle()!r}"
        if ax.images and not hasattr(ax, "_colorbar"):
            assert "\u00b0E" in ax.get_xlabel() and "\u00b0N" in ax.get_ylabel()
    canvas = FigureCanvasAgg(fig)  # closed figures lose their pyplot canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in [fig._suptitle] + [a.title for a in fig.axes] if t is not None and t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for (a, ta), (b, tb) in itertools.combinations(zip(boxes, texts), 2):
        assert not a.overlaps(b), f"{ta.get_text()!r} overlaps {tb.get_text()!r}"


@pytest.mark.slow
def test_evaluate_writes_the_scientist_figures(evaluated_run: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from train.__main__ import main

    figures = _capture(monkeypatch)
    out = tmp_path / "report"
    assert main(["evaluate", "--config", str(evaluated_run), "--output", str(out), "--no-progress"]) == 0
    text = (out / "report.md").read_text()
    for png in ("error_maps_lead12h.png", "taylor_lead3h.png", "taylor_lead6h.png", "taylor_lead12h.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in text
    assert "n/a = no exceedance in the split" in text and "exceedance = value >= 75 ug m-3" in text
    assert len(figures) == 8  # maps, error maps, rmse by lead, 3 Taylor diagrams, alpha, scan order
    for fig in figures:
        _check_labels_and_layout(fig)
    error_maps = figures[1]
    assert all(_coastline(ax) for ax in error_maps.axes if ax.images and not hasattr(ax, "_colorbar"))
