"""`python -m pipeline inspect`: validate a feature store (or a shard set) and print a summary.

Store checks: schema (arrays, dims, dtypes), shapes against the root attrs, every scan-order row a
permutation and consistent with its sectors, no NaN/inf in the arrays that must be finite, train
statistics present, finite and positive. A non-empty problem list gives exit code 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from pipeline.config import add_override_argument, load_pipeline_config
from pipeline.scan import orders_from_sectors
from pipeline.store import SCHEMA, SCHEMA_VERSION, expected_dtype, read_attrs

MUST_BE_FINITE = ("fields", "elevation", "patch_elevation", "patch_elevation_std", "wind_speed")


def _bad_rows(order: da.Array) -> da.Array:
    """Per time step: True where the row is not a permutation of 0..L-1."""
    n = order.shape[1]
    return order.map_blocks(lambda a: (np.sort(a, axis=1) != np.arange(n)).any(axis=1), drop_axis=1, dtype=bool)


def _mismatched_rows(order: da.Array, sector: da.Array, attrs: dict, regions: tuple[int, int]) -> da.Array:
    """Per time step: True where the order differs from the one the stored sectors imply.

    Out-of-range sectors are clipped here (and reported separately) so this check still runs.
    """
    grid, sectors = tuple(attrs["patch_grid"]), attrs["sectors"]
    return da.map_blocks(
        lambda o, s: (orders_from_sectors(np.clip(s, -1, sectors - 1), grid, regions, sectors) != o).any(axis=1),
        order, sector.rechunk((order.chunks[0], -1)), drop_axis=1, dtype=bool,
    )


def _schema_problems(ds: xr.Dataset, attrs: dict) -> list[str]:
    gh, gw = attrs["patch_grid"]
    ry, rx = attrs["regions"]
    want_sizes = {"lat": attrs["grid"][0], "lon": attrs["grid"][1], "token": gh * gw, "region": ry * rx,
                  "var": len(attrs["variables"])}
    problems = [f"dim {d!r} has size {ds.sizes.get(d)}, attrs imply {n}" for d, n in want_sizes.items() if ds.sizes.get(d) != n]
    for name, (dims, _) in SCHEMA.items():
        if name not in ds:
            problems.append(f"array {name!r} is missing")
            continue
        dtype = expected_dtype(name, gh * gw)
        if ds[name].dims != dims or str(ds[name].dtype) != dtype:
            problems.append(f"array {name!r} is {ds[name].dims} {ds[name].dtype}, expected {dims} {dtype}")
    if "var" in ds.coords and [str(v) for v in ds["var"].values] != list(attrs["variables"]):
        problems.append(f"var coordinate {list(ds['var'].values)} differs from attrs variables {attrs['variables']}")
    if "lat" in ds.coords and not (np.diff(ds["lat"].values) > 0).all():
        problems.append("latitude is not strictly ascending")
    return problems


def _value_problems(ds: xr.Dataset, attrs: dict) -> list[str]:
    """Data checks, computed in one Dask pass."""
    checks = {f"{name} holds NaN/inf": ~da.isfinite(ds[name].data).all() for name in MUST_BE_FINITE}
    sectors = attrs["sectors"]
    for name in ("region_sector", "global_sector"):
        s = ds[name].data
        checks[f"{name} outside -1..{sectors - 1}"] = ((s < -1) | (s >= sectors)).any()
    times = ds["time"].values
    rows = {
        "scan_order": (_bad_rows(ds["scan_order"].data), _mismatched_rows(ds["scan_order"].data, ds["region_sector"].data, attrs, tuple(attrs["regions"]))),
        "scan_order_global": (_bad_rows(ds["scan_order_global"].data), _mismatched_rows(ds["scan_order_global"].data, ds["global_sector"].data[:, None], attrs, (1, 1))),
    }
    flags, bad = dask.compute(checks, rows)
    problems = [msg for msg, hit in flags.items() if hit]
    for name, (perm, match) in bad.items():
        if perm.any():
            problems.append(f"{name}: {perm.sum()} row(s) are not permutations, first at time {times[np.argmax(perm)]}")
        elif match.any():
            problems.append(f"{name}: {match.sum()} row(s) disagree with the stored sectors, first at time {times[np.argmax(match)]}")
    mean, std = ds["stats_mean"].values, ds["stats_std"].values
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        problems.append("stats_mean/stats_std missing or not finite (build unfinished?)")
    elif (std <= 0).any():
        names = [str(v) for v, s in zip(ds["var"].values, std) if s <= 0]
        problems.append(f"stats_std is zero for {names}: normalisation would divide by zero")
    return problems


def validate_store(path: str | Path) -> list[str]:
    """Problems of the feature store at `path` (empty list = valid)."""
    path = Path(path)
    attrs = read_attrs(path)
    if attrs is None or "schema_version" not in attrs:
        return [f"{path} is not a readable feature store (no Zarr group with schema_version)"]
    problems = []
    if attrs["schema_version"] != SCHEMA_VERSION:
        return [f"schema version {attrs['schema_version']} != {SCHEMA_VERSION}: rebuild the store"]
    if attrs.get("build_state") != "complete":
        problems.append(f"build_state is {attrs.get('build_state')!r}, not 'complete': rerun build to finish it")
    ds = xr.open_zarr(path, consolidated=False)
    problems += _schema_problems(ds, attrs)
    return problems if problems else _value_problems(ds, attrs)


def summarize_store(path: str | Path) -> str:
    """Human-readable summary: layout, time span, variables with units and train statistics."""
    path = Path(path)
    ds = xr.open_zarr(path, consolidated=False)
    a = ds.attrs
    times = ds["time"].values
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    calm = float((ds["region_sector"] == -1).mean())
    lines = [
        f"feature store {path} ({size / 2**20:.1f} MiB, build_state={a.get('build_state')})",
        f"  time: {ds.sizes['time']} steps, {np.datetime_as_string(times[0], 'm')} .. {np.datetime_as_string(times[-1], 'm')}, every {a['step_hours']} h",
        f"  grid {a['grid'][0]}x{a['grid'][1]}, patch {a['patch_size']} -> {ds.sizes['token']} tokens, "
        f"regions {a['regions'][0]}x{a['regions'][1]}, {a['sectors']} sectors, calm region-steps {calm:.1%}",
        f"  targets {a['targets']}, leads {a['leads_h']} h, splits "
        + ", ".join(f"{k} {v[0][:10]}..{v[1][:10]}" for k, v in a["splits"].items()),
        f"  {'variable':<12}{'units':<16}{'train mean':>14}{'train std':>14}",
    ]
    for name, mean, std in zip(ds["var"].values, ds["stats_mean"].values, ds["stats_std"].values):
        lines.append(f"  {str(name):<12}{a['units'][str(name)]:<16}{mean:>14.4g}{std:>14.4g}")
    return "\n".join(lines)


def _inspect_one(path: Path) -> list[str]:
    """Validate and summarise a store or (directory with manifest.json) a shard set."""
    if (path / "manifest.json").is_file():
        from pipeline.shardset import summarize_shard_set, validate_shard_set  # the shard stage's own checks

        problems, summary = validate_shard_set(path), summarize_shard_set
    else:
        problems, summary = validate_store(path), summarize_store
    try:
        print(summary(path))
    except Exception as exc:  # a broken store may not even summarise; the problems below say why
        print(f"{path}: no summary ({type(exc).__name__}: {exc})")
    for problem in problems:
        print(f"PROBLEM {path}: {problem}")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", type=Path, help="features.zarr, or a shard directory holding manifest.json")
    parser.add_argument("--config", help="inspect the config's store, and its shard set if one exists")
    add_override_argument(parser, "data.shards=other/shards (with --config)")


def run(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.config is None):
        raise ValueError("give exactly one of PATH or --config")
    if args.config:
        data = load_pipeline_config(args.config, args.overrides).data
        paths = [Path(data.store)] + ([Path(data.shards)] if (Path(data.shards) / "manifest.json").is_file() else [])
    else:
        paths = [args.path]
    problems = [p for path in paths for p in _inspect_one(path)]
    print("OK" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0
