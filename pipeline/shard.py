"""`python -m pipeline shard`: features.zarr -> `{split}-NNNNNN.tar` WebDataset shards + manifest.json.

Why shards: training streams large sequential reads from a parallel file system instead of random
Zarr chunk reads. One sample per input time t whose input is valid; its targets are the target
variables at t + lead, looked up inside the same split (a train sample never reads val/test values,
so no leakage) and NaN where t + lead is past the split's data (the loader masks them). Input times
that are a gap in the store (`valid` False) are skipped and listed in the manifest by reason.

The manifest copies the store's record; statistics come from the store (computed by the build).
Reruns are cheap and exact: tar headers are fixed (mtime, uid/gid, names, mode) so the same store
gives byte-identical shards; a shard is written under a temporary name and renamed once closed,
then recorded in the manifest (sha256, bytes, count, the split positions it covers). A rerun
against the same store and settings keeps every leading shard that still verifies and rewrites
from the first missing or damaged one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import dask
import numpy as np
import pandas as pd
import webdataset as wds
import xarray as xr
from tqdm import tqdm

from pipeline.codec import ENCODERS, SAMPLE_MEMBERS
from pipeline.config import PipelineConfig, ShardConfig, load_pipeline_config
from pipeline.features import STATIC_OUTPUTS, TIME_OUTPUTS
from pipeline.records import ManifestRecord, ShardEntry, ShardPlan, SplitRecord, StaticEntry, Statistics, StoreRecord
from pipeline.shardset import (key_index, manifest_path, read_manifest, sample_key, shard_name, shard_problem,
                               summarize_shard_set, write_manifest)
from pipeline.store import open_features
from topoflow.config import add_override_argument
from topoflow.errors import ShardSetError, StoreError
from topoflow.files import atomic_write_bytes, sha256_file, sha256_json, writing
from topoflow.lock import exclusive
from topoflow.progress import progress_bar

log = logging.getLogger("pipeline")
TAR_MTIME = 946684800  # 2000-01-01T00:00Z: a fixed mtime makes reruns byte-identical
TAR_OWNER = "topoflow"  # uname/gname; uid/gid stay tarfile's default 0
INPUT_MISSING = "input missing"  # skip reasons: the input time is a gap in the store,
TARGET_MISSING = "target missing"  # or a target time t + lead inside the split is
KEPT = "then rerun shard (finished shards are kept)"
PER_TIME = tuple(o for o in TIME_OUTPUTS if o.member and o.name != "fields")  # small per-sample arrays


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

    def __init__(self, root: Path, split: str, record: SplitRecord, cfg: ShardConfig, save: Callable[[], None]) -> None:
        self.record, self.save, self.root = record, save, root
        self.pending: list[int] = []
        self.next_start = record.shards[-1].stop if record.shards else 0
        self.writer = wds.ShardWriter(
            str(root / (shard_name(split, 0).replace("000000", "%06d") + ".tmp")),
            maxcount=cfg.max_count, maxsize=cfg.max_size, post=self._finish,
            start_shard=len(record.shards), verbose=0, encoder=ENCODERS,
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
        entry = ShardEntry(name=final.name, count=len(self.pending), bytes=tmp.stat().st_size,
                           sha256=sha256_file(tmp), start=self.next_start, stop=self.pending[-1] + 1)
        os.replace(tmp, final)
        self.record.shards.append(entry)
        self.next_start, self.pending = entry.stop, []
        self.save()

    def write(self, position: int, sample: dict[str, Any]) -> None:
        with writing(self.root, KEPT):
            self.writer.write(sample)  # may close the previous shard first (its post hook sees `pending`)
        self.pending.append(position)

    def close(self) -> None:
        with writing(self.root, KEPT):
            self.writer.close()

    def abort(self) -> None:
        """Drop the shard being written (never renamed, never recorded): a failed run leaves no temporary tar."""
        if self.writer.tarstream is not None:
            with contextlib.suppress(Exception):
                self.writer.tarstream.close()
            self.writer.tarstream = None
            Path(self.writer.fname).unlink(missing_ok=True)


def _target_positions(times: np.ndarray, leads_h: list[int]) -> np.ndarray:
    """(n, n_leads) split position of t + lead, or -1 where that time is not in the split."""
    target_times = times[:, None] + np.array(leads_h, dtype="timedelta64[h]")[None, :]
    pos = np.searchsorted(times, target_times)
    found = (pos < len(times)) & (times[np.minimum(pos, len(times) - 1)] == target_times)
    return np.where(found, pos, -1)


def split_index(time: np.ndarray, record: StoreRecord, split: str) -> np.ndarray:
    """Store indices of a split's time steps (sorted)."""
    period = record.splits[split]
    return np.nonzero((time >= np.datetime64(period.start)) & (time <= np.datetime64(period.end)))[0]


def _sample(split: str, pos: int, time: np.datetime64, x: np.ndarray, y: np.ndarray, per_time: dict[str, np.ndarray],
            j: int, leads_h: list[int]) -> dict[str, Any]:
    key = sample_key(split, pos)
    return {"__key__": key, "input.npy": x, "target.npy": y,
            **{o.member: per_time[o.name][j] for o in PER_TIME},
            "meta.json": {"time": pd.Timestamp(time).isoformat(), "leads_h": leads_h, "key": key}}


def _write_split(ds: xr.Dataset, record: StoreRecord, cfg: PipelineConfig, split: str, out: SplitRecord,
                 root: Path, save: Callable[[], None], bar: tqdm) -> None:
    """Write the samples of one split from the first position not yet covered by a good shard."""
    store_index = split_index(ds.time.values, record, split)
    times, valid = ds.time.values[store_index], ds.valid.values[store_index]
    targets = _target_positions(times, record.leads_h)
    window = _Window(ds.fields, store_index)
    writer = _SplitWriter(root, split, out, cfg.shard, save)
    block = cfg.build.time_chunk

    def read(start: int) -> tuple[int, int, np.ndarray, int, dict[str, np.ndarray]]:
        """Rows for positions [start, stop) and their targets; the window never mutates old arrays."""
        stop = min(start + block, len(times))
        window.load(start, max(stop, int(targets[start:stop].max()) + 1))
        (per_time,) = dask.compute({o.name: ds[o.name].isel(time=store_index[start:stop]).data for o in PER_TIME})
        return start, stop, window.rows, window.start, per_time

    bar.update(writer.next_start)
    starts = list(range(writer.next_start, len(times), block))
    try:
        with dask.config.set(scheduler="threads"), ThreadPoolExecutor(1) as pool:
            future = pool.submit(read, starts[0]) if starts else None
            for i in range(len(starts)):
                start, stop, rows, rows_start, per_time = future.result()
                future = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
                for pos in range(start, stop):
                    bar.update(1)
                    sample = _sample_at(pos, split, times, valid, targets, rows, rows_start, per_time, pos - start,
                                        record, out)
                    if sample is not None:
                        writer.write(pos, sample)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    out.complete = True


def _sample_at(pos: int, split: str, times: np.ndarray, valid: np.ndarray, targets: np.ndarray, rows: np.ndarray,
               rows_start: int, per_time: dict[str, np.ndarray], j: int, record: StoreRecord, out: SplitRecord
               ) -> dict[str, Any] | None:
    """The sample of split position `pos`, or None (its skip reason recorded) if an input or target is missing."""
    why = INPUT_MISSING if not valid[pos] else TARGET_MISSING if not valid[targets[pos][targets[pos] >= 0]].all() \
        else None
    if why:
        out.skipped.setdefault(why, []).append(sample_key(split, pos))
        return None
    y = np.full((len(record.leads_h), len(record.target_index), *rows.shape[2:]), np.nan, dtype=np.float32)
    for lead, tpos in enumerate(targets[pos]):
        if tpos >= 0:
            y[lead] = rows[tpos - rows_start][record.target_index]
    return _sample(split, pos, times[pos], rows[pos - rows_start], y, per_time, j, record.leads_h)


def _write_static(ds: xr.Dataset, root: Path) -> dict[str, StaticEntry]:
    """Static arrays beside the manifest as .npy (loaded once per process by the trainer)."""
    arrays = {o.member: ds[o.name].values for o in STATIC_OUTPUTS if o.member}
    arrays.update({"lat.npy": ds.lat.values.astype(np.float64), "lon.npy": ds.lon.values.astype(np.float64)})
    entries = {}
    for member, values in arrays.items():
        path = root / member
        atomic_write_bytes(path, wds.writer.numpy_dumps(np.ascontiguousarray(values)))
        entries[member.removesuffix(".npy")] = StaticEntry(file=member, shape=list(values.shape),
                                                           dtype=str(values.dtype), sha256=sha256_file(path))
    return entries


def _kept_shards(root: Path, old: ManifestRecord | None, plan: ShardPlan, split: str) -> SplitRecord:
    """The split record to resume from: leading shards of a compatible old manifest that still verify."""
    if old is None or old.plan != plan or split not in old.splits:
        return SplitRecord()
    before = old.splits[split]
    kept = []
    for entry in before.shards:
        if shard_problem(root / entry.name, entry) is not None:
            break
        kept.append(entry)
    if before.complete and len(kept) == len(before.shards):
        return before.model_copy(deep=True)
    covered = kept[-1].stop if kept else 0
    skipped = {why: [k for k in keys if key_index(k) < covered] for why, keys in before.skipped.items()}
    return SplitRecord(skipped=skipped, shards=kept)


def _old_manifest(root: Path) -> ManifestRecord | None:
    try:
        return read_manifest(root)
    except ShardSetError:
        return None


def _statistics(ds: xr.Dataset) -> Statistics:
    return Statistics(mean=ds.stats_mean.values.tolist(), std=ds.stats_std.values.tolist(),
                      static_mean=ds.static_mean.values.tolist(), static_std=ds.static_std.values.tolist())


def _remove_stale(root: Path, old: ManifestRecord | None, manifest: ManifestRecord) -> None:
    """Delete shards an older manifest listed that the new set no longer has (a different plan)."""
    if old is None:
        return
    current = {s.name for r in manifest.splits.values() for s in r.shards}
    for entry in (s for r in old.splits.values() for s in r.shards):
        if entry.name not in current:
            (root / entry.name).unlink(missing_ok=True)


def write_shards(cfg: PipelineConfig, *, progress: bool = True) -> Path:
    """Write (or complete) the shard set of cfg.data.store into cfg.data.shards; returns manifest.json."""
    ds, record = open_features(cfg.data.store)
    why = record.mismatch(cfg.data)
    if why:
        raise StoreError(f"feature store {cfg.data.store} was built from another config:\n  " + "\n  ".join(why) +
                         "\nrebuild it with `python -m pipeline build --config CONFIG --overwrite`")
    sizes = {k: len(split_index(ds.time.values, record, k)) for k in record.splits}
    root = Path(cfg.data.shards)
    with exclusive(root, "shard set"):
        with writing(root, KEPT):
            root.mkdir(parents=True, exist_ok=True)
        _write_shard_set(ds, record, cfg, root, sizes, progress)
    return manifest_path(root)


def _write_shard_set(ds: xr.Dataset, record: StoreRecord, cfg: PipelineConfig, root: Path, sizes: dict[str, int],
                     progress: bool) -> None:
    """Manifest first (resuming from the shards that still verify), then every split, then `complete`."""
    plan = ShardPlan(store_fingerprint=sha256_json(record.model_dump(mode="json")), max_count=cfg.shard.max_count,
                     max_size=cfg.shard.max_size)
    old = _old_manifest(root)
    for stale in root.glob("*.tar.tmp"):  # a killed run's unfinished shard (this run holds the lock)
        stale.unlink()
    manifest = ManifestRecord(store_path=str(cfg.data.store), store=record, plan=plan, members=list(SAMPLE_MEMBERS),
                              statistics=_statistics(ds), static=_write_static(ds, root),
                              splits={split: _kept_shards(root, old, plan, split) for split in record.splits})
    save = lambda: write_manifest(root, manifest)  # noqa: E731
    save()
    with progress_bar(sum(sizes.values()), desc="shard", unit="sample", log=log, enabled=progress) as bar:
        for split, out in manifest.splits.items():
            out.n_times = sizes[split]
            if out.complete:
                bar.update(sizes[split])
                continue
            _write_split(ds, record, cfg, split, out, root, save, bar)
            save()
    _remove_stale(root, old, manifest)
    manifest.complete = True
    save()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (sections data, build, shard)")
    add_override_argument(parser, "shard.max_count=128")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = load_pipeline_config(args.config, args.overrides)
    path = write_shards(cfg, progress=not args.no_progress)
    print(summarize_shard_set(path))
    return 0
