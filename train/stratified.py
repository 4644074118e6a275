"""Terrain-stratified skill for `train.evaluate`: the same running sums as the whole-grid skill, per stratum.

The strata (`train.terrain`: mountain, basin, plain) come from the feature store's DEM (`elevation`)
on the shard set's loss mask; each (stratum, source, pollutant, lead) keeps a `SkillAccumulator` fed the
cells of its stratum. metrics.json's `strata` key (see `summary`):

    {"definition": str, "cells": {stratum: loss-mask cells},
     "skill": {stratum: {source: {pollutant: {lead: {rmse, mae, bias, ...}}}}}}

A stratum without cells has null scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from train.baselines import SOURCES
from train.metrics import SkillAccumulator, exceedance_threshold
from train.shards import ShardSet
from train.terrain import BASIN_DEPTH_M, ROUGHNESS_WINDOW, STRATA, terrain_strata

Skill = dict[str, dict[str, dict[int, SkillAccumulator]]]  # source -> pollutant -> lead -> sums
DEFINITION = (f"mountain: {ROUGHNESS_WINDOW}x{ROUGHNESS_WINDOW}-cell elevation std above its 75th percentile over the "
              f"loss mask; basin: not mountain, and more than {BASIN_DEPTH_M:g} m below the DEM filled to its spill "
              "points (reconstruction by erosion, Soille 2004); plain: the other loss-mask cells")


def load_strata(ds: xr.Dataset, shards: ShardSet) -> dict[str, np.ndarray]:
    """(H, W) masks of STRATA on the loss mask, from the DEM of `ds`, the store the shard set was written from."""
    return terrain_strata(ds["elevation"].values, shards.loss_mask)


class StratifiedSkill:
    """Running skill sums per stratum; `update` beside the whole-grid accumulators, `summary` at the end."""

    def __init__(self, masks: dict[str, np.ndarray], shards: ShardSet) -> None:
        units = shards.record.units
        self.masks = masks
        self.skill: dict[str, Skill] = {
            stratum: {src: {p: {lead: SkillAccumulator(exceedance_threshold(p, units[p])) for lead in shards.leads_h}
                            for p in shards.targets} for src in SOURCES} for stratum in masks}

    def update(self, source: str, pollutant: str, lead: int, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray,
               weight: np.ndarray) -> None:
        """Add (B, H, W) cells where `valid`, split by stratum; `weight` is the latitude weight."""
        for stratum, cells in self.masks.items():
            self.skill[stratum][source][pollutant][lead].update(pred, truth, valid & cells, weight)

    def summary(self, scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """metrics.json's `strata` from `scores`, stratum -> the (rank-merged) metrics of its Skill."""
        return {"definition": DEFINITION, "cells": {s: int(m.sum()) for s, m in self.masks.items()},
                "skill": {s: {src: v for src, v in scores[s].items() if src in SOURCES} for s in STRATA if s in scores}}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def strata_markdown(strata: dict[str, Any], uphill: dict[str, Any] | None) -> str:
    """report.md's terrain section: stratum cell counts, RMSE and bias per stratum, and the uphill diagnostic."""
    skill, names = strata["skill"], list(strata["skill"])
    cells = ", ".join(f"{s} {n}" for s, n in strata["cells"].items())
    lines = ["", "## Skill by terrain stratum", "", f"- strata: {strata['definition']}",
             f"- loss-mask cells per stratum: {cells}"]
    if uphill is not None:
        lines.append(f"- attention crossing more than {uphill['threshold_m']:g} m uphill (block {uphill['block']}, "
                     f"{uphill['query_rows']} query rows): with bias {_fmt(uphill['with_bias'])}, without bias "
                     f"{_fmt(uphill['without_bias'])}, uniform attention {_fmt(uphill['uniform'])}")
    lines += ["", "| pollutant | lead (h) | source | " + " | ".join(f"{s} RMSE | {s} bias" for s in names) + " |",
              "|---|---|---|" + "---|---|" * len(names)]
    first = skill[names[0]]
    for pollutant, by_lead in first["model"].items():
        for lead in by_lead:
            for source in (s for s in SOURCES if s in first):
                row = [f"{_fmt(skill[s][source][pollutant][lead]['rmse'])} | {_fmt(skill[s][source][pollutant][lead]['bias'])}"
                       for s in names]
                lines.append(f"| {pollutant} | {lead} | {source} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
