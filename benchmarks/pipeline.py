"""Feature build throughput vs a plain xarray copy, and vectorised scan orders vs a per-region loop.

Side by side in one run on the reference grid (128x256 at 0.25 deg, patch 2 -> 64x128 = 8192 tokens,
32x32 regions, 15 variables), with a synthetic hourly source written inside the script:
- build: `build_features` (validation, template, all features, statistics, finish) against
  `xarray.open_dataset(source).to_zarr(...)` with the same time chunks and compressor, both on the
  same running Dask LocalCluster (startup excluded from both). Goal: build time <= 1.3x copy time.
- scan: `scan_orders` per time block (as inside the build) against a straightforward loop
  (`for step: for region: mean wind, snap, sort patches by projection`). Goal: >= 100x per step.
Runs are interleaved (copy, build, copy, build, ...) and medians reported; writes
benchmarks/results/pipeline.json.

Usage: .venv/bin/python benchmarks/pipeline.py [--steps 240] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
# sys.path[0] is this script's folder, where this very file would shadow the `pipeline` package.
sys.path[0:1] = [str(REPO), str(REPO / "tests")]
from conftest import write_synthetic_source  # noqa: E402  (the tests' fast synthetic source writer)

import xarray as xr  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from pipeline.build import build_features  # noqa: E402
from pipeline.cluster import BloscThreadsOff  # noqa: E402
from pipeline.config import PipelineConfig, add_override_argument, load_pipeline_config  # noqa: E402
from pipeline.scan import scan_orders  # noqa: E402
from pipeline.store import encodings  # noqa: E402


def bench_config(workdir: Path, steps: int, overrides: list[str]) -> PipelineConfig:
    """configs/topoflow_china.yaml with its period cut to `steps` hours and paths in workdir."""
    raw = yaml.safe_load((REPO / "configs" / "topoflow_china.yaml").read_text())
    start = np.datetime64("2016-01-01T00:00")
    at = lambda h: str(start + np.timedelta64(int(h), "h"))  # noqa: E731
    data = raw["data"]
    data.update(raw=str(workdir / "raw.nc"), store=str(workdir / "features.zarr"), shards=str(workdir / "shards"))
    data["sample"]["period"] = {"start": at(0), "end": at(steps - 1)}
    cut = steps * 2 // 3
    data["splits"] = {"train": {"start": at(0), "end": at(cut - 1)}, "val": {"start": at(cut), "end": at(steps - 1)}}
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump({k: raw[k] for k in ("data", "build", "shard")}))
    return load_pipeline_config(path, overrides)


def plain_copy(cfg: PipelineConfig, target: Path) -> None:
    """The I/O reference: same source, same time chunks and compressor, no features."""
    with xr.open_dataset(cfg.data.raw, chunks={"time": cfg.build.time_chunk}) as src:
        src.to_zarr(target, mode="w", encoding=encodings(src, cfg), zarr_format=cfg.build.zarr_format, consolidated=False)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240, help="hourly time steps of the synthetic source")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-steps", type=int, default=8, help="steps timed with the per-region loop")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    add_override_argument(parser, "build.n_workers=2")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(workdir, args.steps, args.overrides)
    print(f"writing a synthetic {args.steps}x{cfg.data.domain.n_lat}x{cfg.data.domain.n_lon} source in {workdir} ...")
    src = write_synthetic_source(cfg)
    source_mb = Path(cfg.data.raw).stat().st_size / 2**20

    copy_times, build_times = [], []
    with LocalCluster(n_workers=cfg.build.n_workers, threads_per_worker=cfg.build.threads_per_worker,
                      processes=cfg.build.processes, dashboard_address=None) as cluster, Client(cluster) as client:
        client.register_plugin(BloscThreadsOff())
        for r in range(args.repeats):
            t0 = time.perf_counter()
            plain_copy(cfg, workdir / "copy.zarr")
            copy_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            build_features(cfg, scheduler=cluster.scheduler_address, overwrite=True, progress=False)
            build_times.append(time.perf_counter() - t0)
            print(f"repeat {r}: copy {copy_times[-1]:.2f} s, build {build_times[-1]:.2f} s")
        workers = len(client.scheduler_info()["workers"])
    copy_s, build_s = statistics.median(copy_times), statistics.median(build_times)

    asc = src.sortby("latitude")
    u, v = asc["u10"].values, asc["v10"].values
    p, regions = cfg.data.patch_size, tuple(cfg.data.regions)
    blocks = range(0, len(u), cfg.build.time_chunk)  # as the build calls it: one time block per task
    vec_s, vec_times = median_time(lambda: [scan_orders(u[b:b + cfg.build.time_chunk], v[b:b + cfg.build.time_chunk], p, regions)
                                            for b in blocks], args.repeats)
    k = args.loop_steps
    loop_s, loop_times = median_time(lambda: loop_scan_orders(u[:k], v[:k], p, regions), args.repeats)
    agree = bool((scan_orders(u[:k], v[:k], p, regions)[0] == loop_scan_orders(u[:k], v[:k], p, regions)).all())
    vec_step, loop_step = vec_s / len(u), loop_s / k

    result = {
        "grid": [cfg.data.domain.n_lat, cfg.data.domain.n_lon], "tokens": cfg.data.n_tokens,
        "regions": list(regions), "variables": len(cfg.data.variables), "steps": args.steps,
        "time_chunk": cfg.build.time_chunk, "dask_workers": workers, "source_mb": round(source_mb, 1),
        "repeats": args.repeats,
        "copy_s": copy_times, "build_s": build_times,
        "copy_steps_per_s": args.steps / copy_s, "build_steps_per_s": args.steps / build_s,
        "build_over_copy": build_s / copy_s, "build_goal_max_ratio": 1.3,
        "scan_vectorised_ms_per_step": vec_step * 1e3, "scan_loop_ms_per_step": loop_step * 1e3,
        "scan_speedup": loop_step / vec_step, "scan_goal_min_speedup": 100, "scan_orders_agree": agree,
        "scan_vectorised_s": vec_times, "scan_loop_s": loop_times,
    }
    out = REPO / "benchmarks" / "results" / "pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"build {result['build_steps_per_s']:.1f} steps/s vs plain copy {result['copy_steps_per_s']:.1f} steps/s: "
          f"build/copy = {result['build_over_copy']:.2f}x (goal <= 1.3x)")
    print(f"scan orders {vec_step * 1e3:.3f} ms/step vectorised vs {loop_step * 1e3:.1f} ms/step loop: "
          f"{result['scan_speedup']:.0f}x (goal >= 100x), identical: {agree}")
    print(f"wrote {out}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
