"""Feature build throughput vs a plain xarray copy, its speed-up with Dask workers, and vectorised scan
orders vs a per-region loop.

Side by side in one run on the reference grid (128x256 at 0.25 deg, patch 2 -> 64x128 = 8192 tokens,
32x32 regions; 11 dynamic + 2 static + 2 coordinate inputs), with a synthetic hourly source written
inside the script, in a scratch folder on the memory filesystem (/dev/shm) when it has room:
- build: `build_features` (source checks, template, every feature, statistics, change spread,
  finalise) against `xarray.open_dataset(source)[dynamic variables].to_zarr(...)` with the same time
  chunks and compressor, both on the same running Dask LocalCluster (startup excluded from both, and
  deleting the previous output too: each run writes into a fresh path). Goal: build time <= 1.3x copy time.
  The workers' user and system (kernel) CPU seconds of each run are kept too. The same comparison is
  repeated with both outputs on disk (the temp folder), reported apart (`outputs_on_disk`): there the
  kernel's file creation and page-cache work dominate, and on this VM vary up to 2x between repeats.
- workers: the same build on LocalClusters of 1 process x 1 thread, 2 processes x 1 thread and 1 process
  x 2 threads (each run on a cluster of its own, warmed by an untimed build; runs interleaved), and the
  first two again over `--long-steps` (60 days). Goal: 2 processes >= 1.7x faster than 1, judged over the
  60 days: a build has a fixed part that one process does while the workers wait (source checks, template,
  statistics: ~0.2 s, measured with Dask's task stream), ~10% of a 20-day build on 1 process and ~4% of a
  60-day one, and real builds span years. Threads share one process's HDF5 lock and GIL, so they are
  expected to gain less.
- weak scaling: 1, 2 and 4 worker processes on 1x, 2x and 4x `--weak-steps` steps (120/240/480 by
  default); efficiency = time(1 process) / time(N processes), 1.0 is perfect. With more processes than
  cores (this machine has 2) the table shows the cost of oversubscription, not scaling.
- store size: the schema-3 store against the same data in the schema-2 layout (static and coordinate
  layers broadcast over time in `fields`), written with the same codec.
- scan: `scan_orders` per time block (as inside the build) against a straightforward loop
  (`for step: for region: mean wind, snap, sort patches by projection`). Goal: >= 100x per step.
Runs are interleaved (copy, build, copy, build, ...) and medians reported; writes
benchmarks/results/pipeline.json.

Usage: .venv/bin/python -m benchmarks.pipeline [--steps 480] [--long-steps 1440] [--repeats 3] [--weak-steps 120]
                                              [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import xarray as xr
from distributed import Client

from benchmarks import save_result
from pipeline.build import build_features
from pipeline.cluster import dask_client
from pipeline.config import PipelineConfig, load_pipeline_config
from pipeline.scan import scan_orders
from pipeline.store import encodings
from tests.helpers import REPO, tiny_raw_config, write_config, write_synthetic_source
from topoflow.config import add_override_argument, read_yaml


def bench_config(workdir: Path, steps: int, overrides: list[str], name: str = "features") -> PipelineConfig:
    """The reference grid of configs/topoflow_china.yaml (128x256, patch 2, 32x32 regions, its build
    settings) over the first `steps` hours, reading one prepared file in workdir (the tests' prepared-file
    recipe), building workdir/NAME.zarr."""
    workdir.mkdir(parents=True, exist_ok=True)
    china = read_yaml(REPO / "configs" / "topoflow_china.yaml")
    raw = tiny_raw_config(workdir)
    raw["data"]["store"] = str(workdir / f"{name}.zarr")
    start = np.datetime64("2016-01-01T00:00")
    at = lambda h: str(start + np.timedelta64(int(h), "h"))  # noqa: E731
    cut = steps * 2 // 3
    raw["data"].update(domain=china["data"]["domain"], step_hours=1, regions=china["data"]["regions"],
                       leads_h=china["data"]["leads_h"], splits={"train": {"start": at(0), "end": at(cut - 1)},
                                                                 "val": {"start": at(cut), "end": at(steps - 1)}})
    raw["build"], raw["shard"] = china["build"], china["shard"]
    return load_pipeline_config(write_config(raw, workdir / f"{name}.yaml"), overrides)


def dynamic_sources(cfg: PipelineConfig) -> list[str]:
    prepared = cfg.data.sources[0]
    return [prepared.selection(v.name).var for v in cfg.data.variables if v.kind == "dynamic"]


def plain_copy(cfg: PipelineConfig, target: Path) -> None:
    """The I/O reference: the same dynamic variables, time chunks and compressor, no features."""
    times = cfg.data.times()
    with xr.open_dataset(cfg.data.sources[0].files, chunks={"time": cfg.build.time_chunk}) as src:
        dyn = src[dynamic_sources(cfg)].sel(time=slice(times[0], times[-1]))
        dyn.to_zarr(target, mode="w", encoding=encodings(dyn, cfg.build), zarr_format=cfg.build.zarr_format,
                    consolidated=False)


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def schema2_fields_mb(cfg: PipelineConfig, workdir: Path) -> float:
    """Size of the same inputs in the schema-2 layout: 15 channels per step, statics and coordinates
    broadcast over time (what `fields` held before schema 3), written with the store's codec."""
    store = xr.open_zarr(cfg.data.store)
    h, w = cfg.data.layout.grid
    lat2d, lon2d = np.meshgrid(store.lat.values, store.lon.values, indexing="ij")
    extra = xr.DataArray(np.concatenate([store["static"].values, lat2d[None], lon2d[None]]).astype(np.float32),
                         dims=("var", "lat", "lon"))
    dynamic = store["fields"].drop_vars([c for c in store["fields"].coords if c not in ("time", "lat", "lon")])
    layers = xr.concat([dynamic, extra.expand_dims(time=store.time).chunk({"time": cfg.build.time_chunk})], "var")
    old = xr.Dataset({"fields": layers.chunk({"time": cfg.build.time_chunk, "var": -1})})
    target = workdir / "schema2_fields.zarr"
    old.to_zarr(target, mode="w", encoding=encodings(old, cfg.build), zarr_format=cfg.build.zarr_format, consolidated=False)
    assert old.sizes["var"] == 15 and (h, w) == old["fields"].shape[2:]
    return folder_mb(target) + folder_mb(Path(cfg.data.store)) - folder_mb(Path(cfg.data.store) / "fields") \
        - folder_mb(Path(cfg.data.store) / "static")


def loop_scan_orders(u: np.ndarray, v: np.ndarray, patch: int, regions: tuple[int, int], sectors: int = 16,
                     calm: float = 0.5) -> np.ndarray:
    """The straightforward per-region version (as in the reference design), one time step at a time."""
    t, h, w = u.shape
    gh, gw = h // patch, w // patch
    ry, rx = regions
    rh, rw = gh // ry, gw // rx
    rows, cols = np.divmod(np.arange(rh * rw), rw)
    centres = 2 * np.pi * np.arange(sectors) / sectors
    out = np.empty((t, gh * gw), dtype=np.int64)
    for step in range(t):
        order = []
        for reg_r in range(ry):
            for reg_c in range(rx):
                cells = (step, slice(reg_r * rh * patch, (reg_r + 1) * rh * patch), slice(reg_c * rw * patch, (reg_c + 1) * rw * patch))
                uu, vv = u[cells].astype(np.float64), v[cells].astype(np.float64)
                speed = np.hypot(uu, vv)
                total = speed.sum()
                um, vm = ((speed * uu).sum() / total, (speed * vv).sum() / total) if total > 0 else (0.0, 0.0)
                local = np.arange(rh * rw)
                if np.hypot(um, vm) >= calm:
                    diff = np.mod(np.arctan2(vm, um) - centres, 2 * np.pi)
                    theta = centres[np.argmin(np.minimum(diff, 2 * np.pi - diff))]
                    local = np.argsort(np.round(cols * np.cos(theta) + rows * np.sin(theta), 9), kind="stable")
                lr, lc = np.divmod(local, rw)
                order.append((reg_r * rh + lr) * gw + reg_c * rw + lc)
        out[step] = np.concatenate(order)
    return out


def median_time(fn, repeats: int) -> tuple[float, list[float]]:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def warmed(client: Client) -> Client:
    """`client` with the build's modules imported on every worker: a worker's first task would otherwise
    pay the imports (seconds), inside the first timed run."""
    client.run(importlib.import_module, "pipeline.build")
    return client


def settle(path: Path | str) -> None:
    """Delete the previous output and flush every dirty page to disk, untimed: a 480-step build writes
    ~0.5 GB, and without the flush its writeback lands in the next run's timing (measured: the same
    build took 2.0 to 3.8 s across five repeats, slower with every repeat)."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def timed_copy(cfg: PipelineConfig, target: Path) -> float:
    """Seconds of one plain copy into `target` (deleting the previous copy is not timed)."""
    settle(target)
    t0 = time.perf_counter()
    plain_copy(cfg, target)
    return time.perf_counter() - t0


def timed_build(cfg: PipelineConfig, client: Client) -> float:
    """Seconds of one build from scratch on `client`'s cluster (deleting the previous store is not timed)."""
    settle(cfg.data.store)
    t0 = time.perf_counter()
    build_features(cfg, scheduler=client.scheduler.address, progress=False)
    return time.perf_counter() - t0


def worker_cpu_s(workers: list[psutil.Process]) -> np.ndarray:
    """(user, system) CPU seconds the local cluster's worker processes have used so far."""
    return np.array([(t.user, t.system) for t in (w.cpu_times() for w in workers)]).sum(axis=0)


def time_build_and_copy(cfg: PipelineConfig, workdir: Path, repeats: int, fresh_folders: bool = False) -> dict:
    """Interleaved copy/build runs on one running cluster, the copy written into workdir and the build into
    cfg.data.store; medians of wall time and of the workers' user and system (kernel) CPU time, sizes and
    the worker count.

    fresh_folders: each repeat writes both outputs into a folder of its own under workdir and nothing is
    deleted until the caller removes workdir (about 1 GB per repeat). On ext4, deleting the previous run's
    ~10,000 files right before a run slows the run's own file creation (ext4 skips recently freed inodes;
    perf: 12% of all samples), which says nothing about a build into an empty folder.
    """
    runs: dict[str, list[tuple[float, float, float]]] = {"copy": [], "build": []}  # (wall, user, system) s
    with dask_client(cfg.build) as client:  # the build's own cluster settings, started once for both
        warmed(client)
        workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
        for r in range(repeats):
            folder = workdir / f"repeat{r}" if fresh_folders else workdir
            run = cfg.model_copy(deep=True)
            run.data.store = folder / "features.zarr" if fresh_folders else cfg.data.store
            for name in runs:
                cpu = worker_cpu_s(workers)
                wall = timed_copy(run, folder / "copy.zarr") if name == "copy" else timed_build(run, client)
                runs[name].append((wall, *(worker_cpu_s(workers) - cpu)))
            print(f"repeat {r}: copy {runs['copy'][-1][0]:.2f} s, build {runs['build'][-1][0]:.2f} s")
    median = {name: np.median(np.array(rows), axis=0) for name, rows in runs.items()}  # wall, user, system
    steps = len(cfg.data.times())
    return {"filesystem": filesystem(workdir), "dask_workers": len(workers), "copy_s": [r[0] for r in runs["copy"]],
            "build_s": [r[0] for r in runs["build"]],
            "worker_cpu_s": {name: {"user": float(m[1]), "system": float(m[2])} for name, m in median.items()},
            "copy_steps_per_s": steps / median["copy"][0], "build_steps_per_s": steps / median["build"][0],
            "build_over_copy": median["build"][0] / median["copy"][0], "build_goal_max_ratio": 1.3,
            "store_mb": round(folder_mb(Path(run.data.store)), 1), "plain_copy_mb": round(folder_mb(folder / "copy.zarr"), 1)}


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (tmpfs, ext4, lustre, ...), from /proc/mounts; "unknown" elsewhere."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    here = str(path.resolve())
    inside = [(point, kind) for point, kind in mounts if here == point or here.startswith(point.rstrip("/") + "/")]
    return max(inside, key=lambda m: len(m[0]))[1] if inside else "unknown"


def memory_workdir(need_bytes: int) -> Path:
    """A scratch folder on the memory filesystem (/dev/shm) when it has room, else in the default temp folder:
    in memory the figures measure the pipeline's own work, not the disk's (`time_outputs_on_disk` has that)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes:
        return Path(tempfile.mkdtemp(prefix="bench_pipeline_", dir=shm))
    return Path(tempfile.mkdtemp(prefix="bench_pipeline_"))


def time_outputs_on_disk(cfg: PipelineConfig, repeats: int) -> dict:
    """The same build-vs-copy runs reading the same source, with both outputs in the default temp folder (disk),
    each repeat in a fresh folder."""
    disk = Path(tempfile.mkdtemp(prefix="bench_pipeline_disk_"))
    try:
        runs = time_build_and_copy(cfg, disk, repeats, fresh_folders=True)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    keep = ("filesystem", "copy_s", "build_s", "worker_cpu_s", "build_over_copy")
    return {"outputs_on_disk": {k: runs[k] for k in keep}}


def build_on_own_cluster(cfg: PipelineConfig, processes: int, threads: int, warm: PipelineConfig) -> float:
    """Seconds of cfg's build on a LocalCluster of `processes` x `threads` started for it alone, after an untimed
    build of `warm` (2 blocks per process) on it, so every worker has paid its first block.

    One cluster at a time: idle LocalClusters kept alongside (to interleave layouts on running clusters) took
    18% of a core here with three of them (nannies, schedulers and workers polling: 7% for one), time the
    2-process runs needed and the 1-process runs did not. A worker's first block took ~0.5 s more."""
    layout = {"n_workers": processes, "threads_per_worker": threads, "processes": True}
    with dask_client(cfg.build.model_copy(update=layout)) as client:
        timed_build(warm, warmed(client))
        shutil.rmtree(warm.data.store, ignore_errors=True)
        return timed_build(cfg, client)


def interleaved_builds(runs: dict[str, tuple[PipelineConfig, int, int]], repeats: int, overrides: list[str]
                       ) -> dict[str, list[float]]:
    """Build times per named run (config, worker processes, threads each), each on a cluster of its own
    (`build_on_own_cluster`), the runs interleaved, so a slow spell of a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    warm_steps = {processes: min(2 * processes * cfg.build.time_chunk, len(cfg.data.times()))
                  for cfg, processes, _ in runs.values()}
    warm = {processes: bench_config(Path(cfg.data.store).parent, warm_steps[processes], overrides, f"warm{processes}")
            for cfg, processes, _ in runs.values()}
    for r in range(repeats):
        for name, (cfg, processes, threads) in runs.items():
            times[name].append(build_on_own_cluster(cfg, processes, threads, warm[processes]))
        print(f"repeat {r}: " + ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items()))
    return times


def time_workers(cfg: PipelineConfig, long: PipelineConfig, repeats: int, overrides: list[str]) -> dict:
    """Speed-up of the build with 2 worker processes, and with 2 threads in one process, over 1 x 1, on cfg's
    period; and of 2 processes on the longer period of `long`, where the fixed part of a build (source checks,
    template, statistics: ~0.2 s on one process whatever the workers) weighs less, as in real builds."""
    layouts = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}  # processes x threads
    runs = {name: (cfg, p, t) for name, (p, t) in layouts.items()}
    runs |= {f"{name} long": (long, p, t) for name, (p, t) in layouts.items() if t == 1}
    times = interleaved_builds(runs, repeats, overrides)
    shutil.rmtree(long.data.store, ignore_errors=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"workers_s": times, "workers_steps": {"short": len(cfg.data.times()), "long": len(long.data.times())},
            "speedup_2_processes": median["1x1"] / median["2x1"], "speedup_2_threads": median["1x1"] / median["1x2"],
            "speedup_2_processes_long": median["1x1 long"] / median["2x1 long"], "speedup_2_processes_goal_min": 1.7}


def time_weak_scaling(workdir: Path, steps_per_process: int, overrides: list[str], repeats: int) -> dict:
    """1, 2 and 4 worker processes on proportionally longer periods of the same source file."""
    counts = (1, 2, 4)
    runs = {f"{n}p": (bench_config(workdir, n * steps_per_process, overrides, f"weak{n}"), n, 1) for n in counts}
    times = interleaved_builds(runs, repeats, overrides)
    base = statistics.median(times["1p"])
    rows = [{"processes": n, "steps": n * steps_per_process, "build_s": statistics.median(times[f"{n}p"]),
             "efficiency": base / statistics.median(times[f"{n}p"])} for n in counts]
    for n in counts:
        shutil.rmtree(runs[f"{n}p"][0].data.store, ignore_errors=True)
    cores = len(os.sched_getaffinity(0))
    return {"weak_scaling": rows, "weak_scaling_s": times, "cores": cores,
            "weak_scaling_note": f"this machine has {cores} cores: rows with more processes than cores show "
                                 "oversubscription (processes share cores), not scaling"}


def time_scan(cfg: PipelineConfig, src: xr.Dataset, repeats: int, loop_steps: int) -> dict:
    """Vectorised scan orders per time block (as the build calls them) against the per-region loop."""
    asc = src.sortby("latitude")
    u, v = asc["u10"].values, asc["v10"].values
    p, regions, chunk = cfg.data.patch_size, tuple(cfg.data.regions), cfg.build.time_chunk
    vec_s, vec_times = median_time(lambda: [scan_orders(u[b:b + chunk], v[b:b + chunk], p, regions)
                                            for b in range(0, len(u), chunk)], repeats)
    k = loop_steps
    loop_s, loop_times = median_time(lambda: loop_scan_orders(u[:k], v[:k], p, regions), repeats)
    agree = bool((scan_orders(u[:k], v[:k], p, regions)[0] == loop_scan_orders(u[:k], v[:k], p, regions)).all())
    vec_step, loop_step = vec_s / len(u), loop_s / k
    return {"scan_vectorised_ms_per_step": vec_step * 1e3, "scan_loop_ms_per_step": loop_step * 1e3,
            "scan_speedup": loop_step / vec_step, "scan_goal_min_speedup": 100, "scan_orders_agree": agree,
            "scan_vectorised_s": vec_times, "scan_loop_s": loop_times}


def report(result: dict) -> None:
    """The summary lines (the JSON holds every run)."""
    disk = result["outputs_on_disk"]
    print(f"build {result['build_steps_per_s']:.1f} steps/s vs plain copy {result['copy_steps_per_s']:.1f} steps/s: "
          f"build/copy = {result['build_over_copy']:.2f}x (goal <= 1.3x) on {result['filesystem']}; outputs on "
          f"{disk['filesystem']}: {disk['build_over_copy']:.2f}x")
    for where, runs in (("", result), (" (disk)", disk)):
        print(f"worker CPU s{where}, user / system: " + ", ".join(
            f"{name} {c['user']:.2f} / {c['system']:.2f}" for name, c in runs["worker_cpu_s"].items()))
    print(f"store {result['store_mb']:.1f} MiB (schema-2 layout of the same data {result['schema2_layout_mb']:.1f} MiB, "
          f"plain copy {result['plain_copy_mb']:.1f} MiB)")
    steps = result["workers_steps"]
    print(f"workers: 2 processes faster than 1 by {result['speedup_2_processes_long']:.2f}x over {steps['long']} steps "
          f"(goal >= 1.7x) and {result['speedup_2_processes']:.2f}x over {steps['short']}; 2 threads in one process "
          f"{result['speedup_2_threads']:.2f}x over {steps['short']}")
    print(f"weak scaling ({result['weak_scaling_note']}):\n  processes  steps  build s  efficiency")
    for row in result["weak_scaling"]:
        print(f"  {row['processes']:9d}  {row['steps']:5d}  {row['build_s']:7.2f}  {row['efficiency']:10.2f}")
    print(f"scan orders {result['scan_vectorised_ms_per_step']:.3f} ms/step vectorised vs "
          f"{result['scan_loop_ms_per_step']:.1f} ms/step loop: {result['scan_speedup']:.0f}x (goal >= 100x), "
          f"identical: {result['scan_orders_agree']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=480, help="hourly time steps of the build-vs-copy and workers "
                        "runs (480: the 20 days issue 15 measured)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-steps", type=int, default=1440, help="hourly time steps of the longer workers runs "
                        "(1440: 60 days)")
    parser.add_argument("--weak-steps", type=int, default=120, help="steps per worker process in the weak-scaling runs")
    parser.add_argument("--loop-steps", type=int, default=8, help="steps timed with the per-region loop")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one on /dev/shm when it "
                        "has room, else in the temp folder); the disk comparison always writes to the temp folder")
    add_override_argument(parser, "build.n_workers=2")
    args = parser.parse_args()
    workdir = args.workdir or memory_workdir(need_bytes=8 << 30)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(workdir, args.steps, args.overrides)
    longest = bench_config(workdir, max(args.steps, 4 * args.weak_steps), args.overrides, "longest")
    long = bench_config(workdir / "long", args.long_steps, args.overrides, "long")
    print(f"writing synthetic {cfg.data.domain.n_lat}x{cfg.data.domain.n_lon} sources of {len(longest.data.times())} "
          f"and {args.long_steps} steps in {workdir} ...")
    src = write_synthetic_source(longest).isel(time=slice(0, args.steps))
    write_synthetic_source(long)  # a file of its own: the plain copy read 480 steps of a 1440-step file 1.3x slower
    result = {"grid": list(cfg.data.layout.grid), "tokens": cfg.data.layout.n_tokens, "regions": list(cfg.data.regions),
              "dynamic_variables": len(cfg.data.dynamic_names), "steps": args.steps,
              "time_chunk": cfg.build.time_chunk,
              "source_mb": round(Path(cfg.data.sources[0].files).stat().st_size / 2**20, 1),
              "repeats": args.repeats, **time_build_and_copy(cfg, workdir, args.repeats),
              "schema2_layout_mb": round(schema2_fields_mb(cfg, workdir), 1),
              **time_outputs_on_disk(cfg, args.repeats),
              **time_workers(cfg, long, args.repeats, args.overrides),
              **time_weak_scaling(workdir, args.weak_steps, args.overrides, args.repeats),
              **time_scan(cfg, src, args.repeats, args.loop_steps)}
    save_result("pipeline", result)
    report(result)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
