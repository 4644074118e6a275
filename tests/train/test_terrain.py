"""Terrain strata on a synthetic DEM, per-stratum skill against a hand computation, the uphill attention
share on a hand-built attention matrix, and the `strata` / `diagnostics` keys of a real evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from train.attention_probe import uphill_mass
from train.metrics import SkillAccumulator
from train.terrain import STRATA, local_std, terrain_strata


def synthetic_dem() -> np.ndarray:
    """12 x 24 cells: a flat 50 m plain, a 300 m bowl inside a 2,000 m ring (columns 1-7) and a rough
    chequerboard mountain block (columns 20-23, 1,000 / 3,000 m)."""
    dem = np.full((12, 24), 50.0)
    dem[2:9, 1:8] = 2000.0  # the ring ...
    dem[3:8, 2:7] = 300.0  # ... around the bowl floor (rows 3-7, columns 2-6)
    rows, cols = np.indices((12, 4))
    dem[:, 20:] = np.where((rows + cols) % 2 == 0, 1000.0, 3000.0)
    return dem


def test_strata_of_a_synthetic_dem() -> None:
    dem = synthetic_dem()
    valid = np.ones(dem.shape, dtype=bool)
    valid[11, :4] = False  # "sea": in no stratum
    strata = terrain_strata(dem, valid)
    assert tuple(strata) == STRATA
    stacked = np.stack(list(strata.values()))
    assert (stacked.sum(axis=0) == valid).all()  # exclusive, and exactly the valid cells

    rough = local_std(dem)
    cut = np.percentile(rough[valid], 75)
    n_mountain = strata["mountain"].sum()
    assert n_mountain == (rough[valid] > cut).sum() and 48 <= n_mountain <= valid.sum() // 4  # the top quartile
    assert strata["mountain"][:, 20:].all()  # the rough block (48 cells, the roughest of the grid)
    assert not strata["mountain"][4:7, 3:6].any() and not strata["mountain"][:, 10:18].any()  # bowl centre, plain
    # the bowl floor lies 1,700 m below its spill point: basin, unless its 3x3 window reaches the ring (mountain wins)
    bowl = np.zeros(dem.shape, dtype=bool)
    bowl[3:8, 2:7] = True
    assert (strata["basin"] == bowl & ~strata["mountain"]).all()
    assert strata["basin"][4:7, 3:6].all()
    assert {name: int(cells.sum()) for name, cells in strata.items()} == {"mountain": 68, "basin": 25, "plain": 191}
    assert strata["plain"][:, 10:18].all() and not strata["plain"][bowl].any()


def test_a_depression_open_to_the_sea_or_edge_is_not_a_basin() -> None:
    dem = synthetic_dem()
    dem[5, 1] = 10.0  # a gap in the ring down to the plain: the bowl drains west
    dem[5, 0] = 5.0
    assert not terrain_strata(dem, np.ones(dem.shape, dtype=bool))["basin"].any()


def test_per_stratum_rmse_and_bias_match_a_hand_computation() -> None:
    pred = np.array([[[1.0, 2.0], [3.0, 4.0]]])  # (B, H, W)
    truth = np.array([[[0.0, 0.0], [1.0, 6.0]]])
    valid = np.array([[[True, True], [True, False]]])
    mountain = np.array([[True, False], [False, True]])
    acc = SkillAccumulator(None)
    acc.update(pred, truth, valid & mountain, np.ones((2, 1)))
    assert acc.result()["rmse"] == pytest.approx(1.0) and acc.result()["bias"] == pytest.approx(1.0)
    plain = SkillAccumulator(None)
    plain.update(pred, truth, valid & ~mountain, np.ones((2, 1)))  # errors 2 and 2
    assert plain.result()["rmse"] == pytest.approx(2.0) and plain.result()["bias"] == pytest.approx(2.0)


def test_uphill_share_of_a_hand_built_attention_matrix() -> None:
    z = torch.tensor([[0.0, 500.0, 1500.0]])  # metres, 3 tokens
    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])  # (B, H, Q, K), rows sum to 1
    # only query 2 (1,500 m) climbs > 1,000 m from key 0 (0 m): 1,500 > 1,000; from key 1: 1,000, not more
    mass = uphill_mass(probs, z, z, 1000.0)
    assert float(mass) == pytest.approx(0.2)
    assert float(mass) / 3 == pytest.approx(0.2 / 3)  # the share: mass over query rows


@pytest.mark.slow
def test_evaluate_reports_strata_and_uphill_share(evaluated_run: Path) -> None:
    config = evaluated_run
    report = config.parent / "run" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    strata = metrics["strata"]
    assert set(strata) == {"definition", "cells", "skill"} and tuple(strata["cells"]) == STRATA
    assert sum(strata["cells"].values()) > 0
    for stratum, cells in strata["cells"].items():
        for source in ("model", "persistence"):
            for by_lead in strata["skill"][stratum][source].values():
                for scores in by_lead.values():
                    assert (scores["rmse"] is not None and math.isfinite(scores["rmse"])) == (cells > 0)
    share = metrics["diagnostics"]["uphill_attention_share"]
    assert share["query_rows"] > 0 and share["threshold_m"] == 1000.0
    for key in ("with_bias", "without_bias", "uniform"):
        assert share[key] is None or 0.0 <= share[key] <= 1.0
    assert "## Skill by terrain stratum" in (report / "report.md").read_text()
