"""`python -m pipeline inspect`: validate a feature store (or a shard set) and print a summary.

Store checks: the record (schema 3, complete), arrays against the feature table (dims, dtypes),
sizes against the record, every scan-order row a permutation consistent with its sectors, no
NaN/inf where values must be finite (dynamic fields on valid steps only), statistics present,
finite and positive. A non-empty problem list gives exit code 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from pipeline.config import load_pipeline_config
from pipeline.records import StoreRecord
from pipeline.scan import orders_from_sectors
from pipeline.shardset import manifest_path, summarize_shard_set, validate_shard_set
from pipeline.store import read_record, schema_problems
from topoflow.config import add_override_argument
from topoflow.errors import ConfigError, StoreError

MUST_BE_FINITE = ("static", "elevation", "patch_elevation", "patch_elevation_std")


def _bad_rows(order: da.Array) -> da.Array:
    """Per time step: True where the row is not a permutation of 0..L-1."""
    n = order.shape[1]
    return order.map_blocks(lambda a: (np.sort(a, axis=1) != np.arange(n)).any(axis=1), drop_axis=1, dtype=bool)


def _mismatched_rows(order: da.Array, sector: da.Array, record: StoreRecord, regions: tuple[int, int]) -> da.Array:
    """Per time step: True where the order differs from the one the stored sectors imply.

    Out-of-range sectors are clipped here (and reported separately) so this check still runs.
    """
    grid, sectors = record.layout.patch_grid, record.sectors
    return da.map_blocks(
        lambda o, s: (orders_from_sectors(np.clip(s, -1, sectors - 1), grid, regions, sectors) != o).any(axis=1),
        order, sector.rechunk((order.chunks[0], -1)), drop_axis=1, dtype=bool,
    )


def _size_problems(ds: xr.Dataset, record: StoreRecord) -> list[str]:
    want = {"lat": record.domain.n_lat, "lon": record.domain.n_lon, "token": record.layout.n_tokens,
            "region": record.layout.n_regions, "var": len(record.names("dynamic")),
            "static_var": len(record.names("static"))}
    problems = [f"dim {d!r} has size {ds.sizes.get(d)}, the record implies {n}" for d, n in want.items()
                if ds.sizes.get(d) != n]
    if "var" in ds.coords and [str(v) for v in ds["var"].values] != record.names("dynamic"):
        problems.append(f"var coordinate {list(ds['var'].values)} differs from the record {record.names('dynamic')}")
    if "lat" in ds.coords and not (np.diff(ds["lat"].values) > 0).all():
        problems.append("latitude is not strictly ascending")
    return problems


def _value_problems(ds: xr.Dataset, record: StoreRecord) -> list[str]:
    """Data checks, computed in one Dask pass."""
    valid = ds["valid"].data
    checks = {f"{name} holds NaN/inf": ~da.isfinite(ds[name].data).all() for name in MUST_BE_FINITE}
    checks["fields hold NaN/inf on valid steps"] = ~da.isfinite(ds["fields"].data[valid]).all()
    checks["wind_speed holds NaN/inf on valid steps"] = ~da.isfinite(ds["wind_speed"].data[valid]).all()
    for name in ("region_sector", "global_sector"):
        s = ds[name].data
        checks[f"{name} outside -1..{record.sectors - 1}"] = ((s < -1) | (s >= record.sectors)).any()
    rows = {
        "scan_order": (_bad_rows(ds["scan_order"].data), _mismatched_rows(
            ds["scan_order"].data, ds["region_sector"].data, record, record.layout.regions)),
        "scan_order_global": (_bad_rows(ds["scan_order_global"].data), _mismatched_rows(
            ds["scan_order_global"].data, ds["global_sector"].data[:, None], record, (1, 1))),
    }
    flags, bad = dask.compute(checks, rows)
    problems = [msg for msg, hit in flags.items() if hit]
    times = ds["time"].values
    for name, (perm, match) in bad.items():
        if perm.any():
            problems.append(f"{name}: {perm.sum()} row(s) are not permutations, first at time {times[np.argmax(perm)]}")
        elif match.any():
            problems.append(f"{name}: {match.sum()} row(s) disagree with the stored sectors, first at time "
                            f"{times[np.argmax(match)]}")
    for kind, mean, std in (("var", "stats_mean", "stats_std"), ("static_var", "static_mean", "static_std")):
        m, s = ds[mean].values, ds[std].values
        if not (np.isfinite(m).all() and np.isfinite(s).all()):
            problems.append(f"{mean}/{std} missing or not finite (build unfinished?)")
        elif (s <= 0).any():
            names = [str(v) for v, x in zip(ds[kind].values, s) if x <= 0]
            problems.append(f"{std} is zero for {names}: normalisation would divide by zero")
    return problems


def validate_store(path: str | Path) -> list[str]:
    """Problems of the feature store at `path` (empty list = valid)."""
    try:
        record = read_record(path)
    except StoreError as exc:
        return [str(exc)]
    problems = [] if record.build_state == "complete" else \
        [f"build_state is {record.build_state!r}, not 'complete': rerun build to finish it"]
    ds = xr.open_zarr(path, consolidated=False)
    problems += schema_problems(ds, record) + _size_problems(ds, record)
    return problems if problems else _value_problems(ds, record)


def summarize_store(path: str | Path) -> str:
    """Human-readable summary: layout, time span, gaps, variables with units and statistics."""
    path = Path(path)
    record = read_record(path)
    ds = xr.open_zarr(path, consolidated=False)
    times = ds["time"].values
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    calm = float((ds["region_sector"] == -1).mean())
    lay = record.layout
    lines = [
        f"feature store {path} ({size / 2**20:.1f} MiB, schema {record.schema_version}, {record.build_state})",
        f"  time: {ds.sizes['time']} steps, {np.datetime_as_string(times[0], 'm')} .. "
        f"{np.datetime_as_string(times[-1], 'm')}, every {record.step_hours} h, {len(record.missing_times)} missing",
        f"  grid {lay.grid[0]}x{lay.grid[1]}, patch {lay.patch_size} -> {lay.n_tokens} tokens, regions "
        f"{lay.regions[0]}x{lay.regions[1]}, {record.sectors} sectors, calm region-steps {calm:.1%}",
        f"  targets {record.targets}, leads {record.leads_h} h, splits "
        + ", ".join(f"{k} {v.start:%Y-%m-%d}..{v.end:%Y-%m-%d}" for k, v in record.splits.items()),
        f"  {'variable':<12}{'kind':<9}{'units':<16}{'mean':>14}{'std':>14}",
    ]
    for kind, dim, mean, std in (("dynamic", "var", "stats_mean", "stats_std"),
                                 ("static", "static_var", "static_mean", "static_std")):
        for name, m, s in zip(ds[dim].values, ds[mean].values, ds[std].values):
            lines.append(f"  {str(name):<12}{kind:<9}{record.units[str(name)]:<16}{m:>14.4g}{s:>14.4g}")
    return "\n".join(lines)


def _inspect_one(path: Path) -> list[str]:
    """Validate and summarise a store or (directory with manifest.json) a shard set."""
    shards = manifest_path(path).is_file()
    problems = validate_shard_set(path) if shards else validate_store(path)
    try:
        print((summarize_shard_set if shards else summarize_store)(path))
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
        raise ConfigError("give exactly one of PATH or --config")
    if args.config:
        data = load_pipeline_config(args.config, args.overrides).data
        paths = [Path(data.store)] + ([Path(data.shards)] if manifest_path(data.shards).is_file() else [])
    else:
        paths = [args.path]
    problems = [p for path in paths for p in _inspect_one(path)]
    print("OK" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0
