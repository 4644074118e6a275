"""Reading: one time block of every dynamic source (build tasks), and the statics (once).

Per block and source: the store times are matched to source times (exactly; a gap no longer than
`gaps.interpolate_max_hours` is linearly interpolated between the source times around it; any other
missing time is a gap, NaN and not valid), every needed variable is read once per file as one slab,
regridded to the target grid, and then derived variables and unit conversions are applied on the
target grid, where the air density of the same time and place is at hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.recipe import BUILTINS
from pipeline.sources.derived import FORMULAS
from pipeline.sources.dem import regrid_elevation
from pipeline.sources.files import Catalog, read_layer
from pipeline.sources.grid import regridder
from pipeline.sources.plan import SourcePlan
from pipeline.sources.units import air_density, conversion
from topoflow.errors import SourceError

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Alignment:
    """How a block's store times map onto one source: the source positions to read, and for each store
    time the two positions (into `read`) and the weight of the first (1 for an exact match)."""

    read: np.ndarray  # sorted source time indices to read
    before: np.ndarray
    after: np.ndarray
    weight: np.ndarray
    valid: np.ndarray  # the store time exists in this source (exactly or interpolated)
    filled: np.ndarray  # ... by interpolation


def align(source_times: np.ndarray, times: np.ndarray, max_gap_h: int) -> Alignment:
    """Exact matches, else interpolation across a short enough gap, else missing."""
    n = len(source_times)
    pos = np.searchsorted(source_times, times)
    exact = (pos < n) & (source_times[np.minimum(pos, n - 1)] == times)
    lo, hi = np.clip(pos - 1, 0, n - 1), np.clip(pos, 0, n - 1)
    span = (source_times[hi] - source_times[lo]) / np.timedelta64(1, "h")
    bracketed = ~exact & (pos > 0) & (pos < n) & (span <= max_gap_h) & (max_gap_h > 0)
    lo, hi = np.where(exact, pos, lo), np.where(exact, pos, hi)
    weight = np.ones(len(times))
    b = np.flatnonzero(bracketed)
    weight[b] = (source_times[hi[b]] - times[b]) / (source_times[hi[b]] - source_times[lo[b]])
    used = exact | bracketed
    read = np.unique(np.concatenate([lo[used], hi[used]]))
    return Alignment(read, np.searchsorted(read, lo), np.searchsorted(read, hi), weight, used, bracketed)


def _read_positions(catalog: Catalog, name: str, positions: np.ndarray) -> np.ndarray:
    """(len(positions), y, x) of one variable at source time indices `positions`, grouped by file."""
    files = catalog.file_of[positions]
    if (files == files[0]).all():  # the usual case: one file holds the whole block, no assembly copy
        return catalog.read(int(files[0]), name, catalog.index_in_file[positions])
    parts = []
    for f in np.unique(files):
        mine = positions[files == f]
        parts.append((np.flatnonzero(files == f), catalog.read(int(f), name, catalog.index_in_file[mine])))
    out = np.empty((len(positions), *parts[0][1].shape[1:]), dtype=np.float32)
    for where, values in parts:
        out[where] = values
    return out


def _fill(values: np.ndarray, catalog: Catalog, name: str) -> np.ndarray:
    if catalog.source.fill is None:  # no pass over the values (3 ms of a 24 x 11 x 128 x 256 block)
        return values
    missing = ~np.isfinite(values)
    if missing.any():
        log.info("source %s: %d missing cell(s) of %s set to %g (fill)", catalog.source.name, int(missing.sum()),
                 name, catalog.source.fill)
        values = np.where(missing, np.float32(catalog.source.fill), values)
    return values


def read_source(plan: SourcePlan, catalog: Catalog, names: list[str], times: np.ndarray
                ) -> tuple[dict[str, np.ndarray], Alignment]:
    """The pool variables `names` of one dynamic source on the target grid at the store times `times`."""
    al = align(catalog.times, times, plan.data.gaps.interpolate_max_hours)
    regrid = regridder(catalog, plan.data.domain)
    out = {}
    for name in names:
        if not len(al.read):
            out[name] = np.full((len(times), plan.data.domain.n_lat, plan.data.domain.n_lon), np.nan, np.float32)
            continue
        grid = regrid(_fill(_read_positions(catalog, name, al.read), catalog, name))
        if al.valid.all() and not al.filled.any() and len(al.read) == len(times):
            out[name] = grid  # every store time read exactly, in order: no gather, no arithmetic
            continue
        w = al.weight[:, None, None].astype(np.float32)
        values = w * grid[al.before] + (1 - w) * grid[al.after]
        values[~al.valid] = np.nan
        out[name] = values
    return out, al


def _derive(plan: SourcePlan, pool: dict[str, np.ndarray]) -> None:
    """Derived variables (in order of definition) from pool variables in the formula's argument units."""
    for name, spec in plan.data.derived.items():
        if name in pool or not all(a in pool for a in spec.args.values()):
            continue
        formula = FORMULAS[spec.formula]
        args = {arg: conversion(plan.units[p], formula.args[arg], name).apply(pool[p], None)
                for arg, p in spec.args.items()}
        pool[name] = formula.compute(**args).astype(np.float32)


def _density(plan: SourcePlan, pool: dict[str, np.ndarray]) -> np.ndarray | None:
    spec = plan.data.air_density
    if spec is None:
        return None
    pressure = conversion(plan.units[spec.pressure], "Pa", "air_density").apply(pool[spec.pressure], None)
    temperature = conversion(plan.units[spec.temperature], "K", "air_density").apply(pool[spec.temperature], None)
    return air_density(pressure, temperature)


def read_block(plan: SourcePlan, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fields (t, V_dynamic, H, W) float32 in store units, valid (t,), filled (t,)) for store times `times`."""
    needed = plan.dynamic_needs()
    pool: dict[str, np.ndarray] = {}
    valid, filled = np.ones(len(times), bool), np.zeros(len(times), bool)
    for catalog in plan.dynamic_catalogs:
        names = [n for n in catalog.source.variables if n in needed]
        if names:
            values, al = read_source(plan, catalog, names, times)
            pool.update(values)
            valid &= al.valid
            filled |= al.filled
    _derive(plan, pool)
    rho = _density(plan, pool)
    dynamic = [v for v in plan.data.variables if v.kind == "dynamic"]
    fields = np.empty((len(times), len(dynamic), plan.data.domain.n_lat, plan.data.domain.n_lon), np.float32)
    for i, spec in enumerate(dynamic):
        fields[:, i] = plan.conversions[spec.name].apply(pool[spec.recipe_name], rho)
    fields[~valid] = np.nan
    return fields, valid, filled & valid


def check_finite(complete: np.ndarray, names: list[str], times: np.ndarray) -> None:
    """Raise naming the first variable and time holding NaN/inf (missing values) on a valid step.

    `complete` (t, V) says which layers have every cell finite (the build reads it off the layer
    counts of `statistics.layer_moments`, so the check needs no pass of its own).
    """
    if not complete.all():
        t, var = np.argwhere(~complete)[0]  # rows in time order: the first bad time, then its first variable
        raise SourceError(f"variable {names[var]} has missing values (NaN/inf) on the target grid, first at "
                          f"{np.datetime_as_string(times[t], 'm')}: fill the gap in that source's files, set its "
                          "`fill`, or trim data.splits to exclude the time")


def read_statics(plan: SourcePlan) -> dict[str, np.ndarray]:
    """Every static pool variable the config uses, on the target grid (H, W), in its pool units."""
    data = plan.data
    wanted = {v.recipe_name for v in data.variables if v.kind == "static"} | {data.static.elevation}
    wanted |= {data.static.loss_mask.variable} if data.static.loss_mask else set()
    wanted |= {a for d in data.derived.values() for a in d.args.values()}
    pool: dict[str, np.ndarray] = {}
    if wanted & set(BUILTINS):  # the embedded DEM only when the recipe uses it
        dem = regrid_elevation(plan.data.domain)
        pool.update(dem_elevation=dem.elevation.astype(np.float32), dem_land_fraction=dem.land_fraction.astype(np.float32))
    for catalog in plan.catalogs:
        if catalog.static:
            regrid = regridder(catalog, plan.data.domain)
            for name in catalog.source.variables:
                raw = read_layer(catalog.dataset(0), catalog.source, name, None).astype(np.float32)
                pool[name] = regrid(_fill(raw, catalog, name))
    _derive(plan, pool)
    return pool
