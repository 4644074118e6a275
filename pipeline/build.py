"""`python -m pipeline build`: raw source -> features.zarr, resumable, on Dask.

The store is built under `<store>.partial`: the template (metadata, coords, static arrays) first,
then one `region=` write per time block aligned to the Zarr chunks. Each finished block sets its
done flag and per-block moments in the `build_progress` subgroup, so a killed build resumes where it
stopped. Only when all blocks are done are the train statistics merged, `build_state` set to
"complete" and the directory renamed to `<store>`: a store at the final path is always finished.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import dask
import numpy as np
import xarray as xr
import zarr
from distributed import as_completed
from tqdm import tqdm

from pipeline.cluster import dask_client
from pipeline.config import PipelineConfig, add_override_argument, load_pipeline_config
from pipeline.features import N_MOMENTS, feature_dataset, merge_moments
from pipeline.source import SourceError, open_source, source_fingerprint
from pipeline.store import (
    PROGRESS_GROUP,
    TIME_ARRAYS,
    StoreError,
    consolidate,
    encodings,
    fingerprint,
    partial_path,
    read_attrs,
    root_attrs,
)


def _mismatch(path: Path, attrs: dict | None, fp: dict[str, str]) -> str | None:
    """Why the store at `path` was not built from these inputs, or None when it was."""
    if attrs is None or "provenance" not in attrs:
        return f"{path} exists but is not a feature store"
    old = {k: attrs["provenance"].get(k) for k in fp}
    changed = [f"{k} {old[k]} -> {fp[k]}" for k in fp if old[k] != fp[k]]
    return f"{path} was built from other inputs ({'; '.join(changed)})" if changed else None


def _write_template(ds: xr.Dataset, path: Path, cfg: PipelineConfig, fp: dict[str, str], n_blocks: int) -> None:
    """Metadata, coords and static arrays; time arrays stay empty until their block is written."""
    ds.attrs = root_attrs(cfg, fp)
    ds.to_zarr(path, mode="w", compute=False, encoding=encodings(ds, cfg), zarr_format=cfg.build.zarr_format, consolidated=False)
    progress = zarr.open_group(str(path / PROGRESS_GROUP), mode="w", zarr_format=cfg.build.zarr_format)
    progress.create_array("done", shape=(n_blocks,), chunks=(1,), dtype=bool, fill_value=False)
    progress.create_array("moments", shape=(n_blocks, ds.sizes["var"], N_MOMENTS), chunks=(1, ds.sizes["var"], N_MOMENTS), dtype="float64", fill_value=np.nan)


def _moments_after_write(_written: None, moments: np.ndarray) -> np.ndarray:
    """Makes a block's result (its moments) depend on its write having finished."""
    return moments


def _block_task(ds: xr.Dataset, moments, path: Path, start: int, stop: int, index: int):  # noqa: ANN001, ANN202
    """One delayed: write the block's time arrays with region=, then return its moments."""
    sub = ds[list(TIME_ARRAYS)].isel(time=slice(start, stop)).drop_vars(list(ds.coords))
    write = sub.to_zarr(path, region={"time": slice(start, stop)}, compute=False, consolidated=False)
    return dask.delayed(_moments_after_write, pure=True)(write, moments.blocks[index])


def _run_blocks(ds: xr.Dataset, moments, path: Path, cfg: PipelineConfig, scheduler: str | None, progress: bool) -> None:
    """Compute and write every block not yet done; record each as it finishes."""
    group = zarr.open_group(str(path / PROGRESS_GROUP), mode="r+")
    done, block_moments = group["done"], group["moments"]
    bounds = np.cumsum((0, *ds["fields"].chunks[0]))
    n_blocks = len(bounds) - 1
    todo = [int(i) for i in np.flatnonzero(~done[:])]
    if not todo:
        return
    with dask_client(cfg.build, scheduler) as client:
        futures, index = [], {}
        for i in todo:  # submitted one by one: workers start while the next block's graph is built
            future = client.compute(_block_task(ds, moments, path, int(bounds[i]), int(bounds[i + 1]), i))
            futures.append(future)
            index[future.key] = i
        bar = tqdm(total=n_blocks, initial=n_blocks - len(todo), unit="block", desc="build", disable=not progress)
        errors: dict[int, BaseException] = {}
        try:
            for future in as_completed(futures):
                i = index[future.key]
                if future.status == "error":
                    # report the earliest failing block (e.g. the first NaN in time): drop later blocks
                    errors[i] = future.exception()
                    client.cancel([f for f in futures if index[f.key] > min(errors)])
                elif future.status == "finished":
                    block_moments[i] = future.result()[0]
                    done[i] = True
                    bar.update()
        finally:
            bar.close()
            client.cancel(futures)
    if errors:
        first = errors[min(errors)]
        if isinstance(first, OSError):
            raise SourceError(
                f"reading the raw source {cfg.data.raw} failed mid-build ({first}); the file is probably "
                "truncated or corrupt: regenerate it, then rerun build (finished blocks are kept)"
            ) from first
        raise first

def _finish(path: Path, final: Path) -> None:
    """Merge statistics, mark complete, consolidate metadata, then move into place atomically."""
    group = zarr.open_group(str(path), mode="r+")
    mean, std = merge_moments(group[PROGRESS_GROUP]["moments"][:])
    group["stats_mean"][:] = mean
    group["stats_std"][:] = std
    group.attrs["build_state"] = "complete"
    consolidate(path)
    if final.exists():  # --overwrite: keep the old store until the new one is in place
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        path.rename(final)
        shutil.rmtree(old)
    else:
        path.rename(final)


def build_features(cfg: PipelineConfig, *, scheduler: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Build (or resume, or confirm up to date) cfg.data.store; returns its path.

    A store or unfinished build from a different config/source is refused unless overwrite=True.
    """
    final = Path(cfg.data.store)
    with open_source(cfg) as src:
        fp = fingerprint(cfg, source_fingerprint(cfg.data.raw))
        if final.exists() and not overwrite:
            attrs = read_attrs(final)
            why = _mismatch(final, attrs, fp)
            if why:
                raise StoreError(f"{why}: pass --overwrite to rebuild it, or set data.store to a new path")
            if attrs.get("build_state") == "complete":
                if progress:
                    print(f"{final} is up to date (config and source unchanged)")
                return final
        path = partial_path(final)
        ds, moments = feature_dataset(src, cfg)
        if path.exists() and not overwrite:
            why = _mismatch(path, read_attrs(path), fp)
            if why:
                raise StoreError(f"unfinished build {why}: pass --overwrite to restart it, or delete {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_template(ds, path, cfg, fp, len(ds["fields"].chunks[0]))
        _run_blocks(ds, moments, path, cfg, scheduler, progress)
    _finish(path, final)
    return final

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (sections data and build are used)")
    add_override_argument(parser, "build.time_chunk=48")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="run on an existing Dask scheduler (tcp://host:8786)")
    parser.add_argument("--cluster", choices=["local", "slurm"], help="override build.cluster (slurm uses build.slurm)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the store or a partial build differs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"build.cluster={args.cluster}"] if args.cluster else [])
    cfg = load_pipeline_config(args.config, overrides)
    path = build_features(cfg, scheduler=args.scheduler, overwrite=args.overwrite, progress=args.progress)
    print(f"feature store ready: {path}")
    return 0
