"""`python -m pipeline build`: raw sources -> features.zarr on Dask, in three steps (anemoi's
init / load / finalise), after every source was checked (`pipeline.sources.describe_sources`).

- init: the template (metadata, coordinates, every static array, empty time arrays) and the
  progress record are written into a temporary directory, then renamed to `<store>.partial`, so a
  partial build either exists whole or not at all.
- load: one Dask task per time block (= one Zarr chunk) reads each source variable once (regridded,
  aligned in time, derived, converted: `pipeline.sources.read_block`), computes
  every time output of the feature table, writes them with Zarr region writes, and last records the
  block's train moments in the progress group (`build_block`), so a killed build resumes where it
  stopped.
- finalise: merge the moments into statistics, compute the per-lead change spread of the targets,
  complete the record, drop the progress group, consolidate, and rename to `<store>`: a store at the
  final path is always finished.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from distributed import as_completed

from pipeline.cluster import dask_client, scheduler_target
from pipeline.config import PipelineConfig, load_pipeline_config
from pipeline.features import TIME_OUTPUTS, Block, Statics
from pipeline.records import Provenance, StoreRecord
from pipeline.sources import SourceSummary, describe_sources, read_block
from pipeline.sources.plan import SourcePlan
from pipeline.sources.read import check_finite
from pipeline.statistics import N_MOMENTS, ChangePlan, grid_moments, layer_moments, merge_moments, pool_moments
from pipeline.store import PROGRESS_GROUP, consolidate, encodings, partial_path, read_record, template
from topoflow.config import add_override_argument, config_hash
from topoflow.errors import SourceError, StoreError
from topoflow.files import writing
from topoflow.lock import exclusive
from topoflow.progress import progress_bar

log = logging.getLogger("pipeline")
LAYOUT_KEYS = ("time_chunk", "zarr_format", "compressor", "compressor_level")  # build settings that change bytes
KEPT = "then rerun build (finished blocks are kept)"
CHANGE_FRAMES = "change_frames"  # the progress group's array of target frames behind the change spread
MOMENTS = "moments"  # the progress group's array of per-block train moments (NaN: block not done)
_TORN_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _git_version() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def provenance(cfg: PipelineConfig, found: SourceSummary) -> Provenance:
    """Sources with content fingerprints, unit conversions, the full data recipe, byte-shaping build
    settings, versions."""
    recipe = cfg.data.model_dump(mode="json", exclude={"store", "shards"})
    conversions = {name: c.text for name, c in found.plan.conversions.items() if c.text}
    return Provenance(
        sources=found.sources,
        conversions=conversions,
        recipe=recipe,
        build=cfg.build.model_dump(mode="json", include=set(LAYOUT_KEYS)),
        config_hash=config_hash(cfg.data.model_copy(update={"store": Path(), "shards": Path(), "sample": None})),
        package_version=importlib.metadata.version("topoflow"),
        git=_git_version(),
        versions={m.__name__: m.__version__ for m in (np, xr, zarr)},
    )


def differences(old: StoreRecord, new: StoreRecord, cfg: PipelineConfig) -> list[str]:
    """Why a store with record `old` is not what this config and source build (empty: it is)."""
    lines = old.mismatch(cfg.data)
    before = [s.fingerprint for s in old.provenance.sources]
    now = [s.fingerprint for s in new.provenance.sources]
    if before != now:  # by content, not by path: a copy of the same files elsewhere is the same source
        lines.append(f"sources {[s.name for s in new.provenance.sources]}: content fingerprints {before} -> {now}")
    lines += [f"build.{k}: stored {old.provenance.build.get(k)}, config {new.provenance.build[k]}"
              for k in LAYOUT_KEYS if old.provenance.build.get(k) != new.provenance.build[k]]
    return lines


def change_plan(record: StoreRecord, cfg: PipelineConfig) -> ChangePlan:
    """The frames behind the change spread: a pure function of the record (gaps, train split, leads)."""
    times, train = cfg.data.times(), record.splits["train"]
    usable = ~times.isin(pd.DatetimeIndex(record.missing_times)) & train.covers(times)
    return ChangePlan.create(usable, [lead // record.step_hours for lead in record.leads_h],
                             record.layout.grid, cfg.build.time_chunk)


def _progress_group(path: Path, record: StoreRecord, cfg: PipelineConfig, n_times: int) -> None:
    """Per-block moments and change-spread frames, both written by the block tasks. A block is done once its
    moments are recorded (NaN until then): the task writes its moments chunk whole (temporary file, then
    rename) after the block's outputs, so the chunk doubles as the done flag.

    Chunk keys are flat (`3.0.0`, no directory per block): finalise deletes the group, and removing its
    directories took 4 ms each here (ext4), 0.2 s of a 240-step build with nested keys.
    """
    n_blocks, n_vars = -(-n_times // cfg.build.time_chunk), len(record.names("dynamic"))
    progress = zarr.open_group(str(path / PROGRESS_GROUP), mode="w", zarr_format=cfg.build.zarr_format)
    flat = {"chunk_key_encoding": {"name": "v2", "separator": "."}}
    progress.create_array(MOMENTS, shape=(n_blocks, n_vars, N_MOMENTS), chunks=(1, n_vars, N_MOMENTS),
                          dtype="float64", fill_value=np.nan, **flat)
    shape = change_plan(record, cfg).storage(n_blocks, len(record.targets), record.layout.grid)
    progress.create_array(CHANGE_FRAMES, shape=shape, chunks=(1, *shape[1:]), dtype="float32", fill_value=np.nan,
                          compressors=None, **flat)  # temporary: uncompressed, a block wrote its frames in 16 ms, not 27


def init(path: Path, record: StoreRecord, statics: Statics, cfg: PipelineConfig) -> None:
    """Template and progress record in a temporary directory, renamed to `path` (`<store>.partial`)."""
    for stale in path.parent.glob(f".{path.name}.init-*"):  # left by a build killed during init (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.init-{os.getpid()}")
    times = cfg.data.times().values
    ds = template(record, times, statics, cfg.build.time_chunk)
    try:
        with writing(path, "then rerun build"):
            encoding = {name: {**ds[name].encoding, **codec} for name, codec in encodings(ds, cfg.build).items()}
            ds.to_zarr(tmp, mode="w", compute=False, encoding=encoding,
                       zarr_format=cfg.build.zarr_format, consolidated=False)
            _progress_group(tmp, record, cfg, len(times))
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(sources: SourcePlan, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        fields, valid, _ = read_block(sources, times)
    except OSError as exc:
        raise SourceError(f"reading the sources failed at {np.datetime_as_string(times[0], 'm')} ({exc}); a file is "
                          "truncated or corrupt: re-download or regenerate it, then rerun build (finished blocks are kept)"
                          ) from exc
    return fields, valid


@functools.lru_cache(maxsize=4)
def _block_arrays(path: str, stamp: tuple[int, int]) -> dict[str, zarr.Array]:
    """The arrays block tasks write, opened once per worker process and store (`stamp`: the store directory's
    inode and mtime, which init's rename sets and block writes leave alone): opening the group and its eight
    arrays again cost 3 ms a block.

    Chunks are written even where they hold only the fill value (`write_empty_chunks`): zarr's check for
    that scans every chunk, 3.5 ms of the 41 ms a 24 x 11 x 128 x 256 `fields` block took to write
    (measured); such a chunk (a block of gaps, a day of sector 0) reads back the same either way.
    """
    group = zarr.open_group(path, mode="r+")
    arrays = {out.name: group[out.name].with_config({"write_empty_chunks": True}) for out in TIME_OUTPUTS}
    return {**arrays, **{name: group[PROGRESS_GROUP][name] for name in (CHANGE_FRAMES, MOMENTS)}}


def write_regions(path: str, block: Block, plan: ChangePlan, start: int, moments: np.ndarray) -> None:
    """Region writes of one block into the template: every time output at [start, start + steps), then into
    the progress group its change frames and, last, its train moments (which mark the block done)."""
    stop = start + len(block.valid)
    steps = plan.block_frames(start, stop)
    with writing(path, KEPT):
        stat = os.stat(path)
        arrays = _block_arrays(path, (stat.st_ino, stat.st_mtime_ns))
        for out in TIME_OUTPUTS:
            arrays[out.name][start:stop] = block.output(out.name)
        if len(steps):  # thinned before the targets are picked: 0.5 ms, not 1.9 (22 frames, 128 x 256)
            arrays[CHANGE_FRAMES][start // plan.block, :len(steps)] = \
                plan.thin(block.fields)[steps - start][:, block.record.target_index]
        arrays[MOMENTS][start // plan.block] = moments


def build_block(start: int, stop: int, sources: SourcePlan, record: StoreRecord, plan: ChangePlan, path: str) -> None:
    """One build task: read the block's sources once, write every time output, the block's change frames and
    its train moments.

    The task records the block itself, instead of returning its moments for the main process to write: no
    result travels back (each was a fetch through the scheduler from the worker holding it), a block is
    recorded even if the main process dies before it hears of it, and the main process and the scheduler
    in it do no work per block beyond the progress bar. Measured on 2 worker processes, 20 blocks: the
    main process's CPU during load 0.15 -> 0.09 s, time it took from the workers on a 2-core machine."""
    times = sources.data.times().values[start:stop]
    fields, valid = _read(sources, times)
    layers = layer_moments(fields)
    names = [f"{v.name!r} (from {v.recipe_name!r})" for v in sources.data.variables if v.kind == "dynamic"]
    check_finite(layers[valid, :, 0] == np.prod(fields.shape[2:]), names, times[valid])
    in_train = valid & record.splits["train"].covers(times)
    write_regions(path, Block(record, fields, valid), plan, start, pool_moments(layers[in_train]))


def _task_argument(value: object) -> object:
    """A task whose result is `value`: block tasks share it as a dependency, so it is pickled and sent once
    per worker, not once per block, and unlike scattered data the scheduler recomputes it if every worker
    holding it left (SLURM jobs ending)."""
    return value


def finished_blocks(moments: np.ndarray) -> np.ndarray:
    """(blocks,) True where the progress group holds a block's moments (`_progress_group`)."""
    return ~np.isnan(moments[:, 0, 0])


def load(path: Path, record: StoreRecord, cfg: PipelineConfig, sources: SourcePlan, scheduler: str | None,
         scheduler_file: Path | None, progress: bool) -> None:
    """Run the build task of every block not yet done (each records itself: `build_block`).

    One future per block (`client.map`: one message to the scheduler for all), not one dask graph
    (`map_blocks`, `to_zarr(compute=False)`): the block task already reads, computes and writes everything
    of its block, so a graph would add nothing but a reduction of the moments, and with futures this
    process counts each block as it finishes, reports the earliest failing block and cancels the later ones.
    """
    moments = zarr.open_group(str(path / PROGRESS_GROUP), mode="r")[MOMENTS][:]
    n_times, chunk, n_blocks = len(cfg.data.times()), cfg.build.time_chunk, len(moments)
    todo = [int(i) for i in np.flatnonzero(~finished_blocks(moments))]
    if not todo:
        return
    errors: dict[int, BaseException] = {}
    plan = change_plan(record, cfg)
    with dask_client(cfg.build, scheduler, scheduler_file) as client:
        sources_f, record_f, plan_f = (client.submit(_task_argument, a, pure=False) for a in (sources, record, plan))
        starts = [i * chunk for i in todo]
        blocks = client.map(build_block, starts, [min(start + chunk, n_times) for start in starts],
                            key=[f"build-block-{i}-{os.getpid()}" for i in todo], pure=False,
                            sources=sources_f, record=record_f, plan=plan_f, path=str(path))
        futures = dict(zip(blocks, todo))
        with progress_bar(n_blocks, initial=n_blocks - len(todo), unit="block", desc="build", log=log,
                          enabled=progress) as bar:
            for future in as_completed(list(futures)):
                i = futures[future]
                if future.status == "error":  # report the earliest failing block (e.g. the first NaN in time)
                    errors[i] = future.exception()
                    client.cancel([f for f, j in futures.items() if j > min(errors)])
                elif future.status == "finished":
                    bar.update()
    if errors:
        raise errors[min(errors)]


def finalise(path: Path, final: Path, record: StoreRecord, cfg: PipelineConfig) -> None:
    """Statistics, change spread, complete record; drop the progress group; move into place atomically."""
    group = zarr.open_group(str(path), mode="r+")
    mean, std = merge_moments(group[PROGRESS_GROUP][MOMENTS][:])
    if not np.isfinite(mean).all():
        raise SourceError(f"the train split {record.splits['train'].start}..{record.splits['train'].end} has no valid "
                          "time step: every one is missing from a source; fix data.splits.train")
    group["stats_mean"][:], group["stats_std"][:] = mean, std
    group["static_mean"][:], group["static_std"][:] = grid_moments(group["static"][:])
    plan = change_plan(record, cfg)
    change, pairs = plan.spread(plan.gather(group[PROGRESS_GROUP][CHANGE_FRAMES][:]))
    done = record.model_copy(update={"build_state": "complete", "change_pairs": pairs,
                                     "change_std": [[None if np.isnan(v) else float(v) for v in row] for row in change]})
    group.attrs.put(done.model_dump(mode="json"))
    shutil.rmtree(path / PROGRESS_GROUP)  # 4x faster than deleting it through zarr, member by member
    consolidate(path)
    if final.exists():  # --overwrite: keep the old store until the new one is in place
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        path.rename(final)
        shutil.rmtree(old)
    else:
        path.rename(final)


def drop_torn_writes(path: Path) -> None:
    """Zarr writes each chunk to `<chunk>.<uuid4 hex>.partial`, then renames it: a build killed in between
    leaves that temporary file, which would otherwise end up in the finished store. Its block is not
    marked done, so the resumed build rewrites the chunk itself."""
    for torn in path.rglob("*.partial"):
        if _TORN_WRITE.search(torn.name) and torn.is_file():
            torn.unlink()


def _resumable(path: Path, new: StoreRecord, cfg: PipelineConfig, overwrite: bool) -> StoreRecord | None:
    """The record of an unfinished build at `path` that this config may resume, else None (start anew)."""
    if overwrite or not path.exists():
        shutil.rmtree(path, ignore_errors=True)
        return None
    old = read_record(path)
    why = differences(old, new, cfg)
    if why:
        raise StoreError(f"unfinished build {path} was started from other inputs:\n  " + "\n  ".join(why) +
                         f"\npass --overwrite to restart it, or delete {path}")
    drop_torn_writes(path)
    return old


def build_features(cfg: PipelineConfig, *, scheduler: str | None = None, scheduler_file: Path | None = None,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Build (or resume, or confirm up to date) cfg.data.store; returns its path.

    The tasks run on the scheduler at `scheduler` (an address) or named by `scheduler_file` if given,
    else on the cluster cfg.build.cluster describes (`pipeline.cluster.dask_client`).

    A store or unfinished build from a different config/source is refused unless overwrite=True; a
    second build of the same store while one runs is refused by the store's lock.
    """
    if scheduler or scheduler_file:  # a wrong --scheduler/--scheduler-file fails before the sources are scanned
        scheduler_target(scheduler, scheduler_file)
    final = Path(cfg.data.store)
    found = describe_sources(cfg.data)
    new = StoreRecord.create(cfg.data, provenance(cfg, found), found.variables).model_copy(
        update={"missing_times": found.missing_times, "filled_times": found.filled_times})
    with exclusive(final, "feature store"):
        if final.exists() and not overwrite:
            old = read_record(final)
            why = differences(old, new, cfg)
            if why:
                raise StoreError(f"{final} was built from other inputs:\n  " + "\n  ".join(why) +
                                 "\npass --overwrite to rebuild it, or set data.store to a new path")
            if old.build_state == "complete":
                if progress:
                    print(f"{final} is up to date (config and sources unchanged)")
                return final
        path = partial_path(final)
        record = _resumable(path, new, cfg, overwrite)
        if record is None:
            record = new
            with writing(path.parent, "then rerun build"):
                path.parent.mkdir(parents=True, exist_ok=True)
            init(path, record, Statics(record, found.static, found.elevation, found.loss_mask), cfg)
        load(path, record, cfg, found.plan, scheduler, scheduler_file, progress)
        with writing(final, KEPT):
            finalise(path, final, record, cfg)
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (sections data and build are used)")
    add_override_argument(parser, "build.time_chunk=48")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--scheduler", metavar="ADDRESS", help="run on an existing Dask scheduler (tcp://host:8786)")
    existing.add_argument("--scheduler-file", metavar="PATH", type=Path,
                          help="run on the existing Dask scheduler that wrote PATH (dask scheduler --scheduler-file)")
    parser.add_argument("--cluster", choices=["local", "slurm"], help="override build.cluster (slurm uses build.slurm)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the store or a partial build differs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"build.cluster={args.cluster}"] if args.cluster else [])
    cfg = load_pipeline_config(args.config, overrides)
    path = build_features(cfg, scheduler=args.scheduler, scheduler_file=args.scheduler_file, overwrite=args.overwrite,
                          progress=args.progress)
    print(f"feature store ready: {path}")
    return 0
