"""`python -m pipeline shard`: features.zarr -> `{split}-NNNNNN.tar` WebDataset shards + manifest.json.

Why shards: training streams large sequential reads from a parallel file system instead of random
Zarr chunk reads. Why frames (shard version 2): a sample's targets are the target fields of later
times that other samples hold as input, so a shard holds each time step once, as a FRAME keyed
`{split}_{position:08d}`: a time-contiguous run of samples (their input frames) plus the target-only
frames their leads reach beyond them (the halo of the longest lead), and the loader assembles each
sample (t, t + leads) inside the shard. Targets are looked up inside the same split (a train sample
never reads val/test values, so no leakage) and are NaN where t + lead is past the split's data.
Input times that are a gap in the store, or whose targets inside the split are, are skipped and
listed in the manifest by reason (`pipeline.shardplan`).

The manifest copies the store's record; statistics come from the store (computed by the build).
The shards are planned before anything is written (a pure function of `valid` and the limits), so
reruns are cheap and exact: tar headers are fixed (mtime, uid/gid, names, mode) so the same store
gives byte-identical shards; a shard is written under a temporary name and renamed once closed,
then recorded in the manifest (sha256, bytes, its samples and frames as runs). A rerun against the
same store and settings keeps every leading shard that still verifies and rewrites from the first
missing or damaged one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import dask
import numpy as np
import pandas as pd
import webdataset as wds
import xarray as xr
from tqdm import tqdm

from pipeline.codec import ENCODERS, FRAME_MEMBERS, encode, frame_key, member_shapes
from pipeline.config import PipelineConfig, ShardConfig, load_pipeline_config
from pipeline.features import STATIC_OUTPUTS, TIME_OUTPUTS
from pipeline.records import (ManifestRecord, ShardEntry, ShardPlan, ShardSpan, SplitRecord, StaticEntry, Statistics,
                              StoreRecord, run_positions)
from pipeline.shardplan import FrameBytes, classify, cut_shards, lead_steps, member_bytes
from pipeline.shardset import manifest_path, read_manifest, shard_name, shard_problem, summarize_shard_set, \
    write_manifest
from pipeline.store import open_features
from topoflow.config import add_override_argument
from topoflow.errors import ShardSetError, StoreError
from topoflow.files import atomic_write_bytes, sha256_file, sha256_json, writing
from topoflow.lock import exclusive
from topoflow.progress import progress_bar

log = logging.getLogger("pipeline")
TAR_MTIME = 946684800  # 2000-01-01T00:00Z: a fixed mtime makes reruns byte-identical
TAR_OWNER = "topoflow"  # uname/gname; uid/gid stay tarfile's default 0
KEPT = "then rerun shard (finished shards are kept)"
PER_TIME = tuple(o for o in TIME_OUTPUTS if o.member and o.name != "fields")  # small per-frame arrays
_SHARD_FILE = re.compile(r"(?P<split>[a-z]+)-\d{6}\.tar")


class _Rows:
    """One split's rows (dynamic fields and per-time outputs), read with dask a block of `block` steps
    at a time, one block ahead in a background thread, and dropped once no shard still to write needs
    them: memory stays at about the longest lead plus two blocks, whatever the shard size."""

    def __init__(self, ds: xr.Dataset, store_index: np.ndarray, block: int, pool: ThreadPoolExecutor) -> None:
        self.ds, self.store_index, self.block, self.pool = ds, store_index, block, pool
        self.blocks: dict[int, Future] = {}

    def _read(self, b: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        index = self.store_index[b * self.block: (b + 1) * self.block]
        (fields, per_time) = dask.compute(self.ds.fields.isel(time=index).data,
                                          {o.name: self.ds[o.name].isel(time=index).data for o in PER_TIME})
        return fields, per_time

    def _submit(self, b: int) -> None:
        if b not in self.blocks and b * self.block < len(self.store_index):
            self.blocks[b] = self.pool.submit(self._read, b)

    def row(self, position: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fields (V, H, W) and per-time outputs of one split position."""
        b, j = divmod(position, self.block)
        self._submit(b)
        self._submit(b + 1)
        fields, per_time = self.blocks[b].result()
        return fields[j], {name: values[j] for name, values in per_time.items()}

    def release_before(self, position: int) -> None:
        for b in [b for b in self.blocks if (b + 1) * self.block <= position]:
            del self.blocks[b]


def split_index(time: np.ndarray, record: StoreRecord, split: str) -> np.ndarray:
    """Store indices of a split's time steps (sorted)."""
    return np.nonzero(record.splits[split].covers(time))[0]


def _frame(split: str, position: int, time: np.datetime64, row: np.ndarray, per_time: dict[str, np.ndarray],
           record: StoreRecord, is_input: bool) -> dict[str, Any]:
    """The members of one frame: an input frame (a sample's input time) or a target-only frame."""
    key = frame_key(split, position)
    meta = {"key": key, "time": pd.Timestamp(time).isoformat()}
    if is_input:
        return {"__key__": key, "input.npy": row, **{o.member: per_time[o.name] for o in PER_TIME}, "meta.json": meta}
    return {"__key__": key, "target.npy": row[record.target_index], "meta.json": meta}


def _frame_at(split: str, times: np.ndarray, rows: _Rows, record: StoreRecord, inputs: frozenset[int],
              position: int) -> dict[str, Any]:
    """The frame of split position `position` of a shard whose samples are `inputs`, from the rolling rows."""
    return _frame(split, position, times[position], *rows.row(position), record, position in inputs)


def frame_bytes(record: StoreRecord, split: str, time: np.datetime64) -> FrameBytes:
    """Tar bytes of an input and of a target-only frame, from frames of the right shapes and dtypes
    (every frame of a kind has the same size), so shards can be cut to `max_size` before writing."""
    shapes = member_shapes(record)
    row = np.zeros(shapes["input.npy"], np.float32)
    per_time = {o.name: np.zeros(shapes[o.member], o.dtype_for(record)) for o in PER_TIME}

    def size(is_input: bool) -> int:
        frame = encode(_frame(split, 0, time, row, per_time, record, is_input))
        return sum(member_bytes(len(value)) for name, value in frame.items() if name != "__key__")

    return FrameBytes(input=size(True), target=size(False))


def _write_shard(root: Path, name: str, span: ShardSpan, frame_at: Callable[[int], dict[str, Any]],
                 release: Callable[[int], None]) -> ShardEntry:
    """Write one shard to `name.tmp`, hash it, rename it: a failure removes the temporary file, so a failed
    run leaves no temporary tar."""
    tmp = root / f"{name}.tmp"
    try:
        _write_tar(root, tmp, span, frame_at, release)
        entry = ShardEntry(name=name, samples=span.samples, frames=span.frames, bytes=tmp.stat().st_size,
                           sha256=sha256_file(tmp))
        with writing(root, KEPT):
            os.replace(tmp, root / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return entry


def _write_tar(root: Path, tmp: Path, span: ShardSpan, frame_at: Callable[[int], dict[str, Any]],
               release: Callable[[int], None]) -> None:
    """A shard's frames in time order with webdataset's TarWriter (fixed headers), then fsync."""
    with writing(root, KEPT):
        fh = open(tmp, "wb")
    with fh:
        tar = wds.TarWriter(fh, encoder=ENCODERS, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER, mode=0o444)
        try:
            for position in run_positions(span.frames):
                frame = frame_at(position)  # reading the store stays outside `writing`: its errors are not ours
                with writing(root, KEPT):
                    tar.write(frame)
                release(position + 1)
        except BaseException:
            with contextlib.suppress(Exception):
                tar.close()  # end the stream now, not when collected (the file is closed and removed by then)
            raise
        with writing(root, KEPT):
            tar.close()
            fh.flush()
            os.fsync(fh.fileno())


def _plan_split(valid: np.ndarray, steps: list[int], cfg: ShardConfig, sizes: FrameBytes, split: str
                ) -> tuple[list[ShardSpan], dict[str, list[str]]]:
    """The shards of one split and the input times skipped, by reason (keys of the skipped times)."""
    is_sample, reasons = classify(valid, steps)
    skipped = {why: [frame_key(split, int(p)) for p in np.flatnonzero(mask)] for why, mask in reasons.items()
               if mask.any()}
    spans = cut_shards(np.flatnonzero(is_sample).tolist(), steps, len(valid), cfg.max_count, cfg.max_size, sizes)
    return spans, skipped


def _write_split(ds: xr.Dataset, record: StoreRecord, cfg: PipelineConfig, split: str, spans: list[ShardSpan],
                 out: SplitRecord, root: Path, save: Callable[[], None], bar: tqdm) -> None:
    """Write the shards of one split after those already recorded in `out`, saving the manifest after each."""
    store_index = split_index(ds.time.values, record, split)
    times = ds.time.values[store_index]
    with dask.config.set(scheduler="threads"), ThreadPoolExecutor(1) as pool:
        rows = _Rows(ds, store_index, cfg.build.time_chunk, pool)
        for number in range(len(out.shards), len(spans)):
            span = spans[number]
            next_first = spans[number + 1].frames[0][0] if number + 1 < len(spans) else len(times)
            frame_at = functools.partial(_frame_at, split, times, rows, record, frozenset(run_positions(span.samples)))
            release = lambda p, keep=next_first: rows.release_before(min(p, keep))  # noqa: E731
            out.shards.append(_write_shard(root, shard_name(split, number), span, frame_at, release))
            save()
            bar.update(span.count)
    out.complete = True


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


def _kept_shards(root: Path, old: ManifestRecord | None, plan: ShardPlan, split: str, spans: list[ShardSpan]
                 ) -> list[ShardEntry]:
    """The leading shards of a compatible old manifest that are the planned ones and still verify."""
    if old is None or old.plan != plan or split not in old.splits:
        return []
    kept: list[ShardEntry] = []
    for entry, span in zip(old.splits[split].shards, spans):
        if (entry.name, entry.samples, entry.frames) != (shard_name(split, len(kept)), span.samples, span.frames) \
                or shard_problem(root / entry.name, entry) is not None:
            break
        kept.append(entry)
    return kept


def _old_manifest(root: Path) -> ManifestRecord | None:
    try:
        return read_manifest(root)
    except ShardSetError:
        return None


def _statistics(ds: xr.Dataset) -> Statistics:
    return Statistics(mean=ds.stats_mean.values.tolist(), std=ds.stats_std.values.tolist(),
                      static_mean=ds.static_mean.values.tolist(), static_std=ds.static_std.values.tolist())


def _remove_stale(root: Path, manifest: ManifestRecord) -> None:
    """Delete shard files of this set's splits that the manifest no longer lists (an older plan or shard
    version wrote them): the directory then holds exactly the shard set."""
    current = {s.name for r in manifest.splits.values() for s in r.shards}
    for path in root.glob("*.tar"):
        match = _SHARD_FILE.fullmatch(path.name)
        if match and match["split"] in manifest.splits and path.name not in current:
            path.unlink()


def write_shards(cfg: PipelineConfig, *, progress: bool = True) -> Path:
    """Write (or complete) the shard set of cfg.data.store into cfg.data.shards; returns manifest.json."""
    ds, record = open_features(cfg.data.store)
    why = record.mismatch(cfg.data)
    if why:
        raise StoreError(f"feature store {cfg.data.store} was built from another config:\n  " + "\n  ".join(why) +
                         "\nrebuild it with `python -m pipeline build --config CONFIG --overwrite`")
    root = Path(cfg.data.shards)
    with exclusive(root, "shard set"):
        with writing(root, KEPT):
            root.mkdir(parents=True, exist_ok=True)
        _write_shard_set(ds, record, cfg, root, progress)
    return manifest_path(root)


def _write_shard_set(ds: xr.Dataset, record: StoreRecord, cfg: PipelineConfig, root: Path, progress: bool) -> None:
    """Plan every split, write the manifest (resuming from the shards that still verify), then every split's
    remaining shards, then `complete`."""
    plan = ShardPlan(store_fingerprint=sha256_json(record.model_dump(mode="json")), max_count=cfg.shard.max_count,
                     max_size=cfg.shard.max_size)
    steps = lead_steps(record.leads_h, record.step_hours)
    old = _old_manifest(root)
    for stale in root.glob("*.tar.tmp"):  # a killed run's unfinished shard (this run holds the lock)
        stale.unlink()
    splits, planned = {}, {}
    for split in record.splits:
        index = split_index(ds.time.values, record, split)
        sizes = frame_bytes(record, split, ds.time.values[0])  # every frame's time has the same ISO length
        planned[split], skipped = _plan_split(ds.valid.values[index], steps, cfg.shard, sizes, split)
        kept = _kept_shards(root, old, plan, split, planned[split])
        splits[split] = SplitRecord(n_times=len(index), skipped=skipped, shards=kept,
                                    complete=len(kept) == len(planned[split]))
    manifest = ManifestRecord(store_path=str(cfg.data.store), store=record, plan=plan, lead_steps=steps,
                              frame_members={kind: list(m) for kind, m in FRAME_MEMBERS.items()},
                              statistics=_statistics(ds), static=_write_static(ds, root), splits=splits)
    save = lambda: write_manifest(root, manifest)  # noqa: E731
    save()
    with progress_bar(sum(r.n_times for r in splits.values()), desc="shard", unit="sample", log=log,
                      enabled=progress) as bar:
        for split, out in splits.items():
            bar.update(out.n_skipped + out.n_samples)
            if not out.complete:
                _write_split(ds, record, cfg, split, planned[split], out, root, save, bar)
                save()
    _remove_stale(root, manifest)
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
