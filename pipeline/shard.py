"""`python -m pipeline shard`: features.zarr -> `{split}-NNNNNN.tar` WebDataset shards + manifest.json.

Why shards: training streams large sequential reads from a parallel file system instead of random
Zarr chunk reads. One sample per input time t; its targets are the target variables at t + lead,
looked up inside the same split (a train sample never reads val/test values, so no leakage) and NaN
where t + lead is past the split's data (the loader masks them). Samples whose input holds NaN are
dropped and listed in the manifest.

Reruns are cheap and exact: tar headers are fixed (mtime, uid/gid, names, mode) so the same store
gives byte-identical shards; a shard is written under a temporary name and renamed once closed,
then recorded in the manifest (sha256, bytes, count, the split positions it covers). A rerun
against the same store and settings keeps every leading shard whose sha256 still matches and
rewrites from the first missing or damaged one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import webdataset as wds
import xarray as xr
from tqdm.auto import tqdm

from pipeline.change_stats import change_std
from pipeline.config import PipelineConfig, ShardConfig, add_override_argument, load_pipeline_config
from pipeline.shardset import (
    SAMPLE_MEMBERS,
    SCHEMA_VERSION,
    STATIC_ARRAYS,
    key_index,
    manifest_path,
    sample_key,
    sha256_file,
    shard_name,
    shard_problem,
    summarize_shard_set,
)
from pipeline.store import open_features

TAR_MTIME = 946684800  # 2000-01-01T00:00Z: a fixed mtime makes reruns byte-identical
TAR_OWNER = "topoflow"  # uname/gname; uid/gid stay tarfile's default 0
_ENCODERS = {  # explicit so nothing can ever be pickled into a shard
    "npy": wds.writer.numpy_dumps,
    "json": lambda obj: json.dumps(obj, sort_keys=True).encode("utf-8"),
}
_PER_TIME = ("scan_order", "scan_order_global", "wind_speed")
_REQUIRED = ("fields", "loss_mask", "patch_elevation", "patch_elevation_std", "stats_mean", "stats_std", *_PER_TIME)


def store_fingerprint(ds: xr.Dataset) -> str:
    """Cheap identity of a feature store: root attrs, variable shapes/dtypes and the time axis."""
    blob = {
        "attrs": ds.attrs,
        "vars": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(ds.data_vars.items())},
        "time": [str(t) for t in ds.time.values[[0, -1]]] + [ds.sizes["time"]],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _check_store(ds: xr.Dataset, cfg: PipelineConfig) -> None:
    """The store must be the one this config builds: every array, variable and target present."""
    fix = "rebuild it with `python -m pipeline build --config CONFIG` using this config"
    missing = [name for name in _REQUIRED if name not in ds]
    if missing:
        raise ValueError(f"feature store {cfg.data.store} lacks the arrays {missing}: {fix}")
    names = [str(v) for v in ds["var"].values]
    if names != cfg.data.variable_names:
        raise ValueError(f"feature store {cfg.data.store} has variables {names}, the config lists "
                         f"{cfg.data.variable_names}: {fix}")
    if ds.sizes["token"] != cfg.data.n_tokens:
        raise ValueError(f"feature store {cfg.data.store} has {ds.sizes['token']} tokens, the config's grid "
                         f"and patch size give {cfg.data.n_tokens}: {fix}")


class _Window:
    """Rolling in-memory copy of `fields` rows for split positions [start, stop), loaded with dask.

    Input blocks overlap their targets' rows (t + lead), so rows already in memory are kept
    instead of being read twice.
    """

    def __init__(self, fields: xr.DataArray, store_index: np.ndarray) -> None:
        self.fields, self.store_index = fields, store_index
        self.start, self.rows = 0, np.empty((0, *fields.shape[1:]), dtype=np.float32)

    def load(self, start: int, stop: int) -> None:
        keep = self.rows[max(0, start - self.start): max(0, stop - self.start)]
        have = self.start + max(0, start - self.start) + len(keep)
        new_from = max(start, have)
        new = self.fields.isel(time=self.store_index[new_from:stop]).values if new_from < stop else keep[:0]
        self.start, self.rows = start, np.concatenate([keep, new]) if len(keep) else new


class _SplitWriter:
    """Writes one split's samples with webdataset's ShardWriter and records finished shards."""

    def __init__(self, root: Path, split: str, record: dict[str, Any], cfg: ShardConfig, save: Any) -> None:
        self.record, self.save = record, save
        self.pending: list[int] = []
        self.next_start = record["shards"][-1]["stop"] if record["shards"] else 0
        self.writer = wds.ShardWriter(
            str(root / (shard_name(split, 0).replace("000000", "%06d") + ".tmp")),
            maxcount=cfg.max_count, maxsize=cfg.max_size, post=self._finish,
            start_shard=len(record["shards"]), verbose=0, encoder=_ENCODERS,
            mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER, mode=0o444,
        )

    def _finish(self, tmp_name: str) -> None:
        """ShardWriter's post hook: fsync, hash, rename to the final name, record, save manifest."""
        tmp = Path(tmp_name)
        if not self.pending:  # ShardWriter opens a stream before the first sample; nothing was written
            tmp.unlink()
            return
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        final = tmp.with_suffix("")
        entry = {"name": final.name, "count": len(self.pending), "bytes": tmp.stat().st_size,
                 "sha256": sha256_file(tmp), "start": self.next_start, "stop": self.pending[-1] + 1}
        os.replace(tmp, final)
        self.record["shards"].append(entry)
        self.next_start, self.pending = entry["stop"], []
        self.save()

    def write(self, position: int, sample: dict[str, Any]) -> None:
        self.writer.write(sample)  # may close the previous shard first (its post hook sees `pending`)
        self.pending.append(position)

    def close(self) -> None:
        self.writer.close()


def _target_positions(times: np.ndarray, leads_h: list[int]) -> np.ndarray:
    """(n, n_leads) split position of t + lead, or -1 where that time is not in the split."""
    target_times = times[:, None] + np.array(leads_h, dtype="timedelta64[h]")[None, :]
    pos = np.searchsorted(times, target_times)
    found = (pos < len(times)) & (times[np.minimum(pos, len(times) - 1)] == target_times)
    return np.where(found, pos, -1)


def _split_index(time: np.ndarray, cfg: PipelineConfig, split: str) -> np.ndarray:
    """Store indices of a split's time steps (sorted)."""
    period = cfg.data.splits[split]
    return np.nonzero((time >= np.datetime64(period.start)) & (time <= np.datetime64(period.end)))[0]


def _stats(ds: xr.Dataset, cfg: PipelineConfig) -> dict[str, Any]:
    """Normalisation statistics of the manifest: the store's per-variable mean/std (train period) and
    the per-lead spread of each target's change (train period, see pipeline.change_stats)."""
    change, pairs = change_std(ds.fields, _split_index(ds.time.values, cfg, "train"), cfg.data.target_index,
                               cfg.data.leads_h)
    return {"mean": ds.stats_mean.values.tolist(), "std": ds.stats_std.values.tolist(),
            "change_std": [[None if np.isnan(v) else float(v) for v in row] for row in change],
            "change_pairs": pairs}


def _write_split(ds: xr.Dataset, cfg: PipelineConfig, split: str, record: dict[str, Any],
                 root: Path, save: Any, bar: tqdm) -> None:
    """Write the samples of one split from the first position not yet covered by a good shard."""
    store_index = _split_index(ds.time.values, cfg, split)
    times = ds.time.values[store_index]
    targets = _target_positions(times, cfg.data.leads_h)
    tvars = cfg.data.target_index
    grid = ds.fields.shape[2:]
    window = _Window(ds.fields, store_index)
    writer = _SplitWriter(root, split, record, cfg.shard, save)
    block = cfg.build.time_chunk

    def read(start: int) -> tuple[int, int, np.ndarray, int, dict[str, np.ndarray]]:
        """Rows for positions [start, stop) and their targets; the window never mutates old arrays."""
        stop = min(start + block, len(times))
        window.load(start, max(stop, int(targets[start:stop].max()) + 1))
        (per_time,) = dask.compute({k: ds[k].isel(time=store_index[start:stop]).data for k in _PER_TIME})
        return start, stop, window.rows, window.start, per_time

    bar.update(writer.next_start)
    starts = list(range(writer.next_start, len(times), block))
    with dask.config.set(scheduler="threads"), ThreadPoolExecutor(1) as pool:
        future = pool.submit(read, starts[0]) if starts else None
        for i in range(len(starts)):
            start, stop, rows, rows_start, per_time = future.result()
            future = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
            for pos in range(start, stop):
                x = rows[pos - rows_start]
                if np.isnan(x).any():
                    record["dropped"].append(sample_key(split, pos))
                    bar.update(1)
                    continue
                y = np.full((len(cfg.data.leads_h), len(tvars), *grid), np.nan, dtype=np.float32)
                for lead, tpos in enumerate(targets[pos]):
                    if tpos >= 0:
                        y[lead] = rows[tpos - rows_start][tvars]
                j = pos - start
                writer.write(pos, {
                    "__key__": sample_key(split, pos),
                    "input.npy": x,
                    "target.npy": y,
                    "scan_order.npy": per_time["scan_order"][j],
                    "scan_order_global.npy": per_time["scan_order_global"][j],
                    "wind_speed.npy": per_time["wind_speed"][j].astype(np.float32),
                    "meta.json": {"time": pd.Timestamp(times[pos]).isoformat(), "leads_h": cfg.data.leads_h,
                                  "key": sample_key(split, pos)},
                })
                bar.update(1)
    writer.close()
    record["complete"] = True


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def _write_static(ds: xr.Dataset, root: Path) -> dict[str, Any]:
    """Static arrays beside the manifest as .npy (loaded once per process by the trainer)."""
    arrays = {
        "patch_elevation": ds.patch_elevation.values.astype(np.float32),
        "patch_elevation_std": ds.patch_elevation_std.values.astype(np.float32),
        "loss_mask": ds.loss_mask.values.astype(bool),
        "lat": ds.lat.values.astype(np.float64),
        "lon": ds.lon.values.astype(np.float64),
    }
    entries = {}
    for name in STATIC_ARRAYS:
        path = root / f"{name}.npy"
        _atomic_write(path, wds.writer.numpy_dumps(np.ascontiguousarray(arrays[name])))
        entries[name] = {"file": path.name, "shape": list(arrays[name].shape), "dtype": str(arrays[name].dtype),
                         "sha256": sha256_file(path)}
    return entries


def _kept_shards(root: Path, old: dict[str, Any] | None, plan: dict[str, Any], split: str) -> dict[str, Any]:
    """The split record to resume from: leading shards of a compatible old manifest that still verify."""
    record: dict[str, Any] = {"n_times": 0, "complete": False, "dropped": [], "shards": []}
    if old is None or old.get("plan") != plan or split not in old["splits"]:
        return record
    old_record = old["splits"][split]
    for shard in old_record["shards"]:
        if shard_problem(root / shard["name"], shard["bytes"], shard["sha256"]) is not None:
            break
        record["shards"].append(shard)
    if old_record["complete"] and len(record["shards"]) == len(old_record["shards"]):
        return dict(old_record)
    covered = record["shards"][-1]["stop"] if record["shards"] else 0
    record["dropped"] = [k for k in old_record["dropped"] if key_index(k) < covered]
    return record


def _read_old_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads(manifest_path(root).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_shards(cfg: PipelineConfig, *, progress: bool = True) -> Path:
    """Write (or complete) the shard set of cfg.data.store into cfg.data.shards; returns manifest.json."""
    ds = open_features(cfg.data.store)
    _check_store(ds, cfg)
    time = ds.time.values
    sizes = {k: len(_split_index(time, cfg, k)) for k in cfg.data.splits}
    empty = [k for k, n in sizes.items() if n == 0]
    if empty:
        raise ValueError(f"split(s) {empty} have no time steps in {cfg.data.store} (it covers {time[0]} .. "
                         f"{time[-1]}): fix data.splits or rebuild the store for this period")
    root = Path(cfg.data.shards)
    root.mkdir(parents=True, exist_ok=True)
    plan = {"schema_version": SCHEMA_VERSION, "fingerprint": store_fingerprint(ds), "leads_h": cfg.data.leads_h,
            "targets": cfg.data.targets, "splits": {k: [v.start.isoformat(), v.end.isoformat()]
                                                   for k, v in cfg.data.splits.items()},
            "max_count": cfg.shard.max_count, "max_size": cfg.shard.max_size}
    old = _read_old_manifest(root)
    same_plan = old is not None and old.get("plan") == plan  # same store and settings: same statistics
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "plan": plan,
        "source": {"store": str(cfg.data.store), "fingerprint": plan["fingerprint"],
                   "provenance": ds.attrs.get("provenance")},
        "variables": cfg.data.variable_names,
        "units": {v.name: v.units for v in cfg.data.variables},
        "targets": cfg.data.targets,
        "leads_h": cfg.data.leads_h,
        "grid": list(ds.fields.shape[2:]),
        "patch_size": cfg.data.patch_size,
        "regions": list(cfg.data.regions),
        "n_tokens": cfg.data.n_tokens,
        "members": list(SAMPLE_MEMBERS),
        "stats": old["stats"] if same_plan else _stats(ds, cfg),
        "static": _write_static(ds, root),
        "splits": {split: _kept_shards(root, old, plan, split) for split in cfg.data.splits},
    }

    def save() -> None:
        _atomic_write(manifest_path(root), json.dumps(manifest, indent=1, sort_keys=True).encode())

    save()
    with tqdm(total=sum(sizes.values()), desc="shard", unit="sample", disable=not progress) as bar:
        for split, record in manifest["splits"].items():
            record["n_times"] = sizes[split]
            if record["complete"]:
                bar.update(sizes[split])
                continue
            _write_split(ds, cfg, split, record, root, save, bar)
            save()
    _remove_stale(root, old, manifest)
    manifest["complete"] = True
    save()
    return manifest_path(root)


def _remove_stale(root: Path, old: dict[str, Any] | None, manifest: dict[str, Any]) -> None:
    """Delete shards an older manifest listed that the new set no longer has (a different plan)."""
    if old is None or "splits" not in old:
        return
    current = {s["name"] for r in manifest["splits"].values() for s in r["shards"]}
    for record in old["splits"].values():
        for shard in record.get("shards", []):
            if shard["name"] not in current:
                (root / shard["name"]).unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (sections data, build, shard)")
    add_override_argument(parser, "shard.max_count=128")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = load_pipeline_config(args.config, args.overrides)
    path = write_shards(cfg, progress=not args.no_progress)
    print(summarize_shard_set(path))
    return 0

