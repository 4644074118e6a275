"""`evaluate` writes metrics.json in DESIGN.md's shape, report.md and the figures; persistence is
checked against numbers computed straight from the feature store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.helpers import write_config
from train.__main__ import main
from train.config import load_experiment_config
from train.metrics import METRIC_NAMES

pytestmark = pytest.mark.slow


def test_evaluate_writes_report(tiny_experiment: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tiny_experiment, tmp_path / "eval.yaml")
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    assert main(["evaluate", "--config", str(config), "--no-progress"]) == 0  # default: best checkpoint
    report = tmp_path / "run" / "report" / "report.md"
    assert f"report: {report}" in capsys.readouterr().out

    cfg = load_experiment_config(config)
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert set(metrics) == {"model", "persistence", "climatology", "diurnal_persistence", "advection", "units",
                            "data", "strata", "diagnostics"}
    n_test = 16  # 2018-01-05T00 .. 01-06T21, 3-hourly
    assert metrics["data"] == {"split": "test", "samples": n_test, "evaluated": n_test, "skipped_shards": [],
                               "capped_by_max_batches": False}
    assert metrics["units"] == {"pm25": "ug m-3", "pm10": "ug m-3", "so2": "ug m-3", "no2": "ug m-3",
                                "co": "mg m-3", "o3": "ug m-3"}
    for source in ("model", "persistence"):
        assert list(metrics[source]) == cfg.data.targets
        for by_lead in metrics[source].values():
            assert list(by_lead) == ["3", "6", "12"]
            for scores in by_lead.values():
                assert tuple(scores) == METRIC_NAMES
                assert scores["rmse"] > 0 and scores["rmse_latw"] > 0

    # persistence from the store: value at t vs value at t + lead, inside the test split, on the loss mask
    ds = xr.open_zarr(cfg.data.store)
    test = ds.sel(time=slice(cfg.data.splits["test"].start, cfg.data.splits["test"].end))
    pm25 = test["fields"].sel(var="pm25").values.astype(np.float64)
    mask = ds["loss_mask"].values
    for lead, steps in (("3", 1), ("12", 4)):
        err = (pm25[:-steps] - pm25[steps:])[:, mask]
        expected_rmse = np.sqrt(np.mean(err**2))
        assert metrics["persistence"]["pm25"][lead]["rmse"] == pytest.approx(expected_rmse, rel=1e-4)
        assert metrics["persistence"]["pm25"][lead]["bias"] == pytest.approx(err.mean(), rel=1e-3, abs=1e-3)

    text = report.read_text()
    assert f"- samples: {n_test} of {n_test} evaluated\n" in text
    assert "| 3 | model |" in text and "| 3 | persistence |" in text
    for png in ("maps_lead12h.png", "rmse_by_lead.png", "alpha.png", "scan_order.png"):
        path = report.parent / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in text


def test_evaluate_without_a_run_is_a_clear_error(tiny_experiment: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    config = write_config(tiny_experiment, tmp_path / "eval.yaml")
    assert main(["evaluate", "--config", str(config)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_residual_run_keeps_its_scale_and_evaluate_requires_it(tiny_experiment: dict, tmp_path: Path) -> None:
    import torch

    from topoflow.errors import CheckpointError
    from train.evaluate import evaluate
    from train.residual import residual_scale
    from train.shards import load_shard_set

    tiny_experiment["train"]["residual"] = True
    config = write_config(tiny_experiment, tmp_path / "residual.yaml")
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    cfg = load_experiment_config(config)
    last = tmp_path / "run" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    scale = residual_scale(load_shard_set(cfg.data.shards))
    assert scale.shape == (3, 6) and bool((scale > 0).all())
    torch.testing.assert_close(ckpt["residual_scale"], scale)
    assert main(["evaluate", "--config", str(config), "--checkpoint", str(last), "--no-progress"]) == 0
    del ckpt["residual_scale"]  # as written before residual scaling existed
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="holds no residual_scale"):
        evaluate(cfg, checkpoint=tmp_path / "old.ckpt", progress=False)
