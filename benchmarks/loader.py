"""Shards and loader: bytes per time step, shuffle quality, throughput.

Side by side in one run on the demo grid (32x64, 11 dynamic of 15 inputs, 4 leads, 6-hourly, the demo
config's period and shard settings), built inside the script with the real pipeline (a synthetic
prepared source -> build -> shard). Measured:
- bytes per time step of the shards against the dynamic fields' bytes per step (float32), for shard
  version 2 (frames: each time once, plus the halo of the longest lead per shard) and version 1 (one
  tar entry per sample holding its input and a copy of every lead's targets). Demo: the train split's
  shards as written. Every config's grid (configs/*.yaml, train split, all steps valid): from the
  exact tar bytes of a frame (`pipeline.shard.frame_bytes`, which tests/pipeline/test_shards.py checks
  against written shards) and the writer's own cut (`pipeline.shardplan.cut_shards`); version 1 from
  the same member sizes (it reproduces the committed version-1 demo shards to the byte). Goal <= 1.3x.
- shuffle quality: the lag-1 correlation of consecutive train batches' mean times (split positions),
  one value per epoch, mean +- std over epochs. Version 2 as the loader delivers it (one rank, no
  workers, the train config's shuffle buffer). Version 1 cannot be run any more, so its order is
  computed with the same plan and stages (`plan_epoch`, `sample_refs`, webdataset's shuffle buffer)
  on version-1 shards (32 consecutive samples, no in-shard shuffle); the same computation for
  version 2 must equal the measured order (`v2_computed_equals_loader`), which vouches for it.
  An i.i.d. shuffle of the same samples is the floor.
- throughput: ShardStream (0/1/2 workers) vs raw tar reads of the same shards (the I/O limit) and
  xarray random access (`open_zarr` + `isel` per sample, as xbatcher-style loaders do), sha256 of the
  train shards, the shard writer. Goals: loader >= 0.7x raw tar and >= 3x xarray random access.
Medians of interleaved repeats; writes benchmarks/results/loader.json.

Usage: .venv/bin/python -m benchmarks.loader [--repeats 5] [--epochs 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import webdataset as wds

from benchmarks import save_result
from pipeline.build import build_features
from pipeline.codec import encode, member_shapes
from pipeline.config import PipelineConfig, load_pipeline_config
from pipeline.records import ManifestRecord, Provenance, ShardEntry, ShardSpan, StoreRecord, VariableRecord, \
    run_positions
from pipeline.shard import frame_bytes, write_shards
from pipeline.shardplan import cut_shards, lead_steps, member_bytes, tar_bytes, to_runs
from pipeline.shardset import dynamic_bytes_per_step, read_manifest
from pipeline.store import open_features
from tests.helpers import REPO, tiny_raw_config, write_config, write_synthetic_source
from topoflow.config import read_yaml
from topoflow.files import sha256_file
from train.config import TrainConfig
from train.loader import ShardStream, stages
from train.loader.plan import plan_epoch, seed_of

BATCH = 16
BUFFER = TrainConfig.model_fields["shuffle_buffer"].default
BUFFERS = (BUFFER, 2 * BUFFER, 4 * BUFFER)  # the shuffle buffers the orders are computed for
V1_DEMO_MAX_COUNT = 32  # configs/demo.yaml's shard.max_count under shard version 1
CONFIGS = ("demo", "era5_cams_china", "topoflow_china")


def setup(workdir: Path) -> tuple[PipelineConfig, Path, float]:
    """The demo config's grid, period, leads, patches and shard settings on the fast synthetic source (one
    prepared file, tests/helpers.py); its store is built once per workdir, its shards written afresh and timed."""
    demo = read_yaml(REPO / "configs" / "demo.yaml")
    raw = tiny_raw_config(workdir)
    raw["data"].update({k: demo["data"][k] for k in ("domain", "step_hours", "leads_h", "patch_size", "regions",
                                                     "splits")})
    raw["build"]["time_chunk"], raw["shard"] = demo["build"]["time_chunk"], demo["shard"]
    cfg = load_pipeline_config(write_config(raw, workdir / "bench.yaml"))
    if not Path(cfg.data.store).exists():
        write_synthetic_source(cfg)
        build_features(cfg, progress=False)
    shutil.rmtree(cfg.data.shards, ignore_errors=True)  # time a full write, not a verified rerun
    t0 = time.perf_counter()
    manifest = write_shards(cfg, progress=False)
    return cfg, manifest.parent, time.perf_counter() - t0


def record_of(cfg: PipelineConfig) -> StoreRecord:
    """The record a build of `cfg` would write, as far as frame sizes go (no store needed)."""
    variables = [VariableRecord(name=v.name, kind=v.kind, units=v.units) for v in cfg.data.variables]
    provenance = Provenance(sources=[], recipe={}, build={}, config_hash="", package_version="")
    return StoreRecord.create(cfg.data, provenance, variables)


def v1_sample_bytes(record: StoreRecord) -> int:
    """Tar bytes of one shard-version-1 sample: input, the targets of every lead, orders, wind speed, meta."""
    shapes = member_shapes(record)
    h, w = record.layout.grid
    order = record.layout.order_dtype
    sample = {"__key__": "train_00000000", "input.npy": np.zeros(shapes["input.npy"], np.float32),
              "target.npy": np.zeros((len(record.leads_h), len(record.targets), h, w), np.float32),
              "scan_order.npy": np.zeros(shapes["scan_order.npy"], order),
              "scan_order_global.npy": np.zeros(shapes["scan_order_global.npy"], order),
              "wind_speed.npy": np.zeros(shapes["wind_speed.npy"], np.float32),
              "meta.json": {"time": "2018-01-01T00:00:00", "leads_h": record.leads_h, "key": "train_00000000"}}
    return sum(member_bytes(len(v)) for k, v in encode(sample).items() if k != "__key__")


def config_bytes(name: str) -> dict[str, Any]:
    """Bytes per train time step of a config's shards (v2 as the writer would cut them, v1 per sample)."""
    cfg = load_pipeline_config(REPO / "configs" / f"{name}.yaml")
    record = record_of(cfg)
    train = cfg.data.splits["train"]
    step = np.timedelta64(cfg.data.step_hours, "h")
    n = len(np.arange(np.datetime64(train.start), np.datetime64(train.end) + 1, step))
    sizes = frame_bytes(record, "train", np.datetime64(train.start))
    spans = cut_shards(range(n), lead_steps(record.leads_h, record.step_hours), n, cfg.shard.max_count,
                       cfg.shard.max_size, sizes)
    v2 = sum(tar_bytes(s.count * sizes.input + (len(run_positions(s.frames)) - s.count) * sizes.target) for s in spans)
    per_step = 4 * len(record.names("dynamic")) * record.layout.grid[0] * record.layout.grid[1]
    return {"grid": list(record.layout.grid), "step_hours": record.step_hours, "max_count": cfg.shard.max_count,
            "train_steps": n, "train_shards": len(spans), "v2_shard_mib": v2 / len(spans) / 2**20,
            "v2_bytes_per_step_vs_dynamic": v2 / (n * per_step),
            "v1_bytes_per_step_vs_dynamic": v1_sample_bytes(record) / per_step}


def lag1(batches: list[list[int]]) -> float:
    """Correlation of consecutive batches' mean times (positions)."""
    means = np.array([np.mean(b) for b in batches])
    return float(np.corrcoef(means[:-1], means[1:])[0, 1])


def computed_order(spans: list[ShardSpan], seed: int, epoch: int, in_shard_shuffle: bool, buffer: int
                   ) -> list[list[int]]:
    """One epoch's train batches (positions) of one rank with no workers, computed with the loader's own plan
    and stages on shards given by their spans (nothing read): what `stages.train_passes` yields in its first
    pass, with or without the in-shard permutation."""
    entries = [ShardEntry(name=f"s{i}", bytes=0, sha256="", samples=s.samples, frames=s.frames)
               for i, s in enumerate(spans)]
    plan = plan_epoch(entries, mode="train", batch_size=BATCH, seed=seed, epoch=epoch, rank=0, world_size=1,
                      readers=1)
    seeds = (seed, epoch, 0, 0)
    local = np.random.default_rng(seed_of(*seeds, 0, 2)) if in_shard_shuffle else None
    shards = (SimpleNamespace(span=e) for e in plan.shards[0])
    refs = wds.shuffle(buffer, buffer, rng=random.Random(seed_of(*seeds)))(stages.sample_refs(shards, local))
    positions = [p for _, p in itertools.islice(refs, plan.batches * BATCH)]
    assert len(positions) == plan.batches * BATCH, "the first pass must fill the epoch for this computation"
    return [positions[i: i + BATCH] for i in range(0, len(positions), BATCH)]


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values)}


def shuffle_quality(shards: Path, manifest: ManifestRecord, epochs: int) -> dict[str, Any]:
    """Lag-1 correlation of consecutive batches' mean times: v2 as the loader delivers it, v1 and v2 computed
    for a few shuffle buffers (v2's computed order must equal the loader's), and an i.i.d. shuffle."""
    entries = manifest.splits["train"].shards
    samples = [p for e in entries for p in run_positions(e.samples)]
    v1 = [ShardSpan(samples=to_runs(c), frames=to_runs(c)) for c in
          (samples[i: i + V1_DEMO_MAX_COUNT] for i in range(0, len(samples), V1_DEMO_MAX_COUNT))]
    loader = ShardStream(shards, "train", BATCH, seed=0, shuffle_buffer=BUFFER)
    measured, iid, matches = [], [], True
    computed: dict[str, dict[str, list[float]]] = {str(b): {"v1": [], "v2": []} for b in BUFFERS}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        order = [[int(k.rsplit("_", 1)[1]) for k in b.keys] for b in loader]
        matches &= order == computed_order(entries, 0, epoch, True, BUFFER)
        measured.append(lag1(order))
        for buffer in BUFFERS:
            computed[str(buffer)]["v1"].append(lag1(computed_order(v1, 0, epoch, False, buffer)))
            computed[str(buffer)]["v2"].append(lag1(computed_order(entries, 0, epoch, True, buffer)))
        perm = np.random.default_rng(seed_of(0, epoch)).permutation(samples)[: len(order) * BATCH].tolist()
        iid.append(lag1([perm[i: i + BATCH] for i in range(0, len(perm), BATCH)]))
    return {"v2_loader": mean_std(measured), "v2_computed_equals_loader": matches, "iid": mean_std(iid),
            "computed_by_shuffle_buffer": {b: {k: mean_std(v) for k, v in rows.items()}
                                           for b, rows in computed.items()},
            "epochs": epochs, "batches_per_epoch": len(loader), "batch_size": BATCH, "loader_shuffle_buffer": BUFFER,
            "v2_samples_per_shard": manifest.plan.max_count, "v1_samples_per_shard": V1_DEMO_MAX_COUNT}


def raw_tar(shards: Path, names: list[str], n_samples: int) -> float:
    """Samples/s reading every member's bytes of the shards with tarfile."""
    t0 = time.perf_counter()
    for name in names:
        with tarfile.open(shards / name) as tar:
            for info in tar:
                tar.extractfile(info).read()
    return n_samples / (time.perf_counter() - t0)


def xarray_random(cfg: PipelineConfig, n: int, seed: int) -> float:
    """Samples/s with open_zarr + isel per sample in random order (inputs, targets, orders, wind)."""
    ds, _ = open_features(cfg.data.store)
    index = np.nonzero(cfg.data.splits["train"].covers(ds.time.values))[0]
    steps = lead_steps(cfg.data.leads_h, cfg.data.step_hours)
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


def throughput(cfg: PipelineConfig, shards: Path, manifest: ManifestRecord, repeats: int) -> dict[str, Any]:
    """Loader (0/1/2 workers) vs raw tar and xarray random access; sha256 of the train shards."""
    train = manifest.splits["train"].shards
    names, n_train = [s.name for s in train], sum(s.count for s in train)
    raw_tar(shards, names, n_train)  # warm the page cache so every contender reads from memory
    t0 = time.perf_counter()
    for name in names:
        sha256_file(shards / name)
    sha_rate = n_train / (time.perf_counter() - t0)
    xr_rates = [xarray_random(cfg, 120, seed) for seed in range(repeats)]
    loaders = {w: ShardStream(shards, "train", BATCH, num_workers=w, seed=0) for w in (0, 1, 2)}
    cold = {w: epoch_rate(loader, 0) for w, loader in loaders.items()}  # worker start + sha256 checks
    tar_rates, warm = [], {w: [] for w in loaders}
    for repeat in range(repeats):  # interleaved, so load from other processes hits all alike
        tar_rates.append(raw_tar(shards, names, n_train))
        for w, loader in loaders.items():
            warm[w].append(epoch_rate(loader, repeat + 1))
    tar, xra = statistics.median(tar_rates), statistics.median(xr_rates)
    return {
        "raw_tar_samples_per_s": tar, "xarray_random_samples_per_s": xra, "sha256_samples_per_s": sha_rate,
        "loader": {str(w): {"warm_samples_per_s": statistics.median(r), "first_epoch_samples_per_s": cold[w],
                            "vs_raw_tar": statistics.median([a / b for a, b in zip(r, tar_rates)]),
                            "vs_xarray_random": statistics.median(r) / xra}
                   for w, r in warm.items()},
    }


def demo_bytes(manifest: ManifestRecord) -> dict[str, Any]:
    """The demo train split's shards as written: bytes per time step against the dynamic fields."""
    train = manifest.splits["train"]
    size = sum(s.bytes for s in train.shards)
    return {"train_steps": train.n_times, "train_samples": train.n_samples, "shards": len(train.shards),
            "shard_bytes": size, "bytes_per_step_vs_dynamic": size / (train.n_times * dynamic_bytes_per_step(manifest))}


def report(result: dict[str, Any]) -> None:
    b, s, t = result["bytes"], result["shuffle_lag1"], result["throughput"]
    print(f"demo shards as written: {b['demo_written']['bytes_per_step_vs_dynamic']:.3f}x the dynamic fields per step")
    for name, row in b["configs"].items():
        print(f"  {name:<16} {row['grid'][0]}x{row['grid'][1]} every {row['step_hours']} h, max_count "
              f"{row['max_count']}: v2 {row['v2_bytes_per_step_vs_dynamic']:.3f}x ({row['train_shards']} train "
              f"shards of {row['v2_shard_mib']:.0f} MiB), v1 {row['v1_bytes_per_step_vs_dynamic']:.3f}x")
    print(f"lag-1 correlation of batch mean times over {s['epochs']} epochs ({s['batches_per_epoch']} batches of "
          f"{s['batch_size']}): v2 loader {s['v2_loader']['mean']:.3f} +- {s['v2_loader']['std']:.3f} (buffer "
          f"{s['loader_shuffle_buffer']}; computed == loader: {s['v2_computed_equals_loader']}), iid "
          f"{s['iid']['mean']:.3f} +- {s['iid']['std']:.3f}")
    for buffer, row in s["computed_by_shuffle_buffer"].items():
        print(f"  buffer {buffer:>4}: v1 ({s['v1_samples_per_shard']}/shard) {row['v1']['mean']:.3f} +- "
              f"{row['v1']['std']:.3f}, v2 ({s['v2_samples_per_shard']}/shard) {row['v2']['mean']:.3f} +- "
              f"{row['v2']['std']:.3f}")
    print(f"raw tar {t['raw_tar_samples_per_s']:.0f}/s, xarray random access {t['xarray_random_samples_per_s']:.0f}/s,"
          f" sha256 check {t['sha256_samples_per_s']:.0f} samples/s")
    for w, res in t["loader"].items():
        print(f"loader {w} workers: {res['warm_samples_per_s']:.0f}/s warm ({res['first_epoch_samples_per_s']:.0f}/s "
              f"first epoch) = {res['vs_raw_tar']:.2f}x raw tar, {res['vs_xarray_random']:.1f}x xarray random access")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the shuffle-quality measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse a directory (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cfg, shards, shard_s = setup(workdir)
        manifest = read_manifest(shards)
        n_all = sum(r.n_samples for r in manifest.splits.values())
        result = {
            "grid": list(manifest.store.layout.grid), "dynamic_variables": len(manifest.store.names("dynamic")),
            "leads": len(manifest.store.leads_h), "batch_size": BATCH, "repeats": args.repeats,
            "shard_writer_samples_per_s": n_all / shard_s,
            "bytes": {"demo_written": demo_bytes(manifest), "configs": {name: config_bytes(name) for name in CONFIGS},
                      "goal_vs_dynamic": 1.3},
            "shuffle_lag1": shuffle_quality(shards, manifest, args.epochs),
            "throughput": throughput(cfg, shards, manifest, args.repeats),
            "goals": {"vs_raw_tar": 0.7, "vs_xarray_random": 3.0},
        }
    report(result)
    save_result("loader", result)


if __name__ == "__main__":
    main()
