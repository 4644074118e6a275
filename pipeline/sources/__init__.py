"""Bring your own reanalysis: the sources recipe (`pipeline.recipe`) opened, checked and read.

`describe_sources` runs in the build's main process before anything is written (files, variables,
grids, units, coverage of the domain and the period, statics); `read_block` runs in each build task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.fingerprint import fingerprint
from pipeline.records import SourceRecord, VariableRecord
from pipeline.sources.files import open_file
from pipeline.sources.plan import SourcePlan, make_plan
from pipeline.sources.read import align, read_block, read_statics
from pipeline.sources.units import conversion
from topoflow.errors import SourceError

__all__ = ["SourceSummary", "describe_sources", "read_block"]
log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class SourceSummary:
    """What the build takes from the sources once: the plan, statics in store units, CF names, gaps."""

    plan: SourcePlan
    static: np.ndarray  # (S, H, W) float32, store units
    elevation: np.ndarray  # (H, W) float32, m
    loss_mask: np.ndarray  # (H, W) bool
    variables: list[VariableRecord]
    missing_times: list[str]
    filled_times: list[str]
    sources: list[SourceRecord]


def _check_period(plan: SourcePlan, times: pd.DatetimeIndex) -> tuple[list[str], list[str]]:
    """Missing and interpolated store times; a source that does not span the period is an error."""
    valid, filled = np.ones(len(times), bool), np.zeros(len(times), bool)
    for catalog in plan.dynamic_catalogs:
        first, last = catalog.times[0], catalog.times[-1]
        if first > times[0] or last < times[-1]:
            raise SourceError(f"source {catalog.source.name!r} covers {np.datetime_as_string(first, 'm')} .. "
                              f"{np.datetime_as_string(last, 'm')} but the store needs {times[0]:%Y-%m-%dT%H:%M} .. "
                              f"{times[-1]:%Y-%m-%dT%H:%M} (data.splits): download the rest, or shorten the splits")
        al = align(catalog.times, times.values.astype("datetime64[ns]"), plan.data.gaps.interpolate_max_hours)
        valid &= al.valid
        filled |= al.filled
    stamp = lambda mask: [t.isoformat() for t in times[mask]]  # noqa: E731
    return stamp(~valid), stamp(filled & valid)


def _cf_names(plan: SourcePlan, name: str) -> tuple[str | None, str | None]:
    """standard_name and long_name of a pool variable as its source gives them (cfgrib writes 'unknown')."""
    if name not in plan.owner:
        return None, None
    catalog = plan.catalogs[plan.owner[name]]
    attrs = open_file(catalog.files[0])[catalog.source.selection(name).var].attrs
    standard = attrs.get("standard_name")
    return (None if standard in (None, "unknown") else str(standard)), attrs.get("long_name")


def _statics(plan: SourcePlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static channels in store units, the barrier's elevation (m) and the loss mask, all finite."""
    data, pool = plan.data, read_statics(plan)
    layers = [plan.conversions[v.name].apply(pool[v.recipe_name], None) for v in data.variables if v.kind == "static"]
    elevation = conversion(plan.units[data.static.elevation], "m", "static.elevation").apply(
        pool[data.static.elevation], None)
    for name, values in [*zip(data.names_of("static"), layers), ("static.elevation", elevation)]:
        if not np.isfinite(values).all():
            raise SourceError(f"static variable {name!r} has {int((~np.isfinite(values)).sum())} missing cell(s) on "
                              "the target grid: set the source's `fill` (e.g. 0 for population over sea)")
    shape = (data.domain.n_lat, data.domain.n_lon)
    mask = pool[data.static.loss_mask.variable] >= data.static.loss_mask.threshold if data.static.loss_mask \
        else np.ones(shape, bool)
    static = np.stack(layers).astype(np.float32) if layers else np.empty((0, *shape), np.float32)
    return static, elevation.astype(np.float32), mask


def describe_sources(data: DataConfig) -> SourceSummary:
    """Open and check every source and read the statics; an error names the source, the file and the fix."""
    plan = make_plan(data)
    missing, filled = _check_period(plan, data.times())
    if missing:
        log.warning("%d store time(s) are missing from a source and will be gaps (valid False), first %s",
                    len(missing), missing[0])
    if filled:
        log.info("%d store time(s) interpolated across gaps of at most %d h, first %s", len(filled),
                 data.gaps.interpolate_max_hours, filled[0])
    static, elevation, mask = _statics(plan)
    variables = [VariableRecord(name=v.name, kind=v.kind, units=v.units,
                                **dict(zip(("standard_name", "long_name"), _cf_names(plan, v.recipe_name))))
                 for v in data.variables]
    sources = [SourceRecord(name=c.source.name, files=len(c.files), regrid=c.source.regrid,
                            fingerprint=fingerprint([Path(f) for f in c.files])) for c in plan.catalogs]
    return SourceSummary(plan, static, elevation, mask, variables, missing, filled, sources)
