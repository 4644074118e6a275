"""Loader throughput: ShardStream (0/1/2 workers) vs raw tar reads and xarray random access.

Side by side in one run on the demo grid (32x64, 11 dynamic of 15 inputs, 4 leads, 6-hourly, the demo
config's period), built inside the script with the real pipeline (synthetic source -> build ->
shard). Reference points:
- raw tar: every member of the same train shards read with `tarfile` (no decoding): the I/O limit;
- xarray random access: `xarray.open_zarr` + `isel` per sample (input, targets at t + lead, scan
  orders, wind), in random order, as xbatcher-style loaders do.
Also measured: sha256 of all train shards (the loader's once-per-process integrity check) and the
shard writer. Goals: loader >= 0.7x raw tar and >= 3x xarray random access. Medians of interleaved repeats;
writes benchmarks/results/loader.json.

Usage: .venv/bin/python -m benchmarks.loader [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import save_result
from pipeline.build import build_features
from pipeline.config import load_pipeline_config
from pipeline.shard import write_shards
from pipeline.shardset import read_manifest
from pipeline.store import open_features
from tests.helpers import REPO, write_synthetic_source
from topoflow.config import read_yaml, write_yaml
from topoflow.files import sha256_file
from train.loader import ShardStream

BATCH = 16


def setup(workdir: Path) -> tuple:
    raw = read_yaml(REPO / "configs" / "demo.yaml")
    raw["data"].update(raw=str(workdir / "raw.nc"), store=str(workdir / "features.zarr"),
                       shards=str(workdir / "shards"))
    raw["shard"] = {"max_count": 32}
    path = workdir / "bench.yaml"
    write_yaml(raw, path)
    cfg = load_pipeline_config(path)
    if not Path(cfg.data.store).exists():
        write_synthetic_source(cfg)
        build_features(cfg, progress=False)
    shutil.rmtree(cfg.data.shards, ignore_errors=True)  # time a full write, not a verified rerun
    t0 = time.perf_counter()
    manifest = write_shards(cfg, progress=False)
    shard_s = time.perf_counter() - t0
    return cfg, manifest.parent, shard_s


def raw_tar(shards: Path, names: list[str]) -> float:
    """Samples/s reading every member's bytes with tarfile (6 members per sample)."""
    t0 = time.perf_counter()
    members = 0
    for name in names:
        with tarfile.open(shards / name) as tar:
            for info in tar:
                tar.extractfile(info).read()
                members += 1
    return members / 6 / (time.perf_counter() - t0)


def xarray_random(cfg, n: int, seed: int) -> float:
    """Samples/s with open_zarr + isel per sample in random order (inputs, targets, orders, wind)."""
    ds, _ = open_features(cfg.data.store)
    period = cfg.data.splits["train"]
    times = ds.time.values
    index = np.nonzero((times >= np.datetime64(period.start)) & (times <= np.datetime64(period.end)))[0]
    steps = [lead // cfg.data.step_hours for lead in cfg.data.leads_h]
    tvars = list(cfg.data.targets)
    order = np.random.default_rng(seed).permutation(index[: len(index) - max(steps)])[:n]
    t0 = time.perf_counter()
    for t in order:
        ds.fields.isel(time=int(t)).values
        ds.fields.isel(time=[int(t) + s for s in steps]).sel(var=tvars).values
        for name in ("scan_order", "scan_order_global", "wind_speed"):
            ds[name].isel(time=int(t)).values
    return len(order) / (time.perf_counter() - t0)


def epoch_rate(loader: ShardStream, epoch: int) -> float:
    """Samples/s of one epoch of a loader."""
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    n = sum(len(b.keys) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="reuse a directory (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cfg, shards, shard_s = setup(workdir)
        manifest = read_manifest(shards)
        train = manifest.splits["train"].shards
        names = [s.name for s in train]
        n_train = sum(s.count for s in train)
        n_all = sum(r.n_samples for r in manifest.splits.values())
        size = sum(s.bytes for s in train)
        print(f"train: {n_train} samples, {len(names)} shards, {size / 2**20:.0f} MiB; "
              f"shard writer {n_all / shard_s:.0f} samples/s")
        raw_tar(shards, names)  # warm the page cache so every contender reads from memory
        t0 = time.perf_counter()
        for name in names:
            sha256_file(shards / name)
        sha_rate = n_train / (time.perf_counter() - t0)
        xr_rates = [xarray_random(cfg, 120, seed) for seed in range(args.repeats)]
        loaders = {w: ShardStream(shards, "train", BATCH, num_workers=w, seed=0) for w in (0, 1, 2)}
        cold = {w: epoch_rate(loader, 0) for w, loader in loaders.items()}  # worker start + sha256 checks
        tar_rates, warm = [], {w: [] for w in loaders}
        for repeat in range(args.repeats):  # interleaved, so load from other processes hits all alike
            tar_rates.append(raw_tar(shards, names))
            for w, loader in loaders.items():
                warm[w].append(epoch_rate(loader, repeat + 1))
    tar, xra = statistics.median(tar_rates), statistics.median(xr_rates)
    result = {
        "grid": list(manifest.store.layout.grid), "dynamic_variables": len(manifest.store.names("dynamic")),
        "leads": len(manifest.store.leads_h),
        "train_samples": n_train, "shards": len(names), "shard_bytes": size, "batch_size": BATCH,
        "repeats": args.repeats, "shard_writer_samples_per_s": n_all / shard_s,
        "raw_tar_samples_per_s": tar, "xarray_random_samples_per_s": xra, "sha256_samples_per_s": sha_rate,
        "loader": {str(w): {"warm_samples_per_s": statistics.median(r), "first_epoch_samples_per_s": cold[w],
                            "vs_raw_tar": statistics.median([a / b for a, b in zip(r, tar_rates)]),
                            "vs_xarray_random": statistics.median(r) / xra}
                   for w, r in warm.items()},
        "goals": {"vs_raw_tar": 0.7, "vs_xarray_random": 3.0},
    }
    print(f"raw tar {tar:.0f}/s, xarray random access {xra:.0f}/s, sha256 check {sha_rate:.0f} samples/s")
    for w, res in result["loader"].items():
        print(f"loader {w} workers: {res['warm_samples_per_s']:.0f}/s warm ({res['first_epoch_samples_per_s']:.0f}/s "
              f"first epoch) = {res['vs_raw_tar']:.2f}x raw tar, {res['vs_xarray_random']:.1f}x xarray random access")
    save_result("loader", result)


if __name__ == "__main__":
    main()
