"""Bring-your-own-data cost: a build from ERA5-like + CAMS-like downloads against one from a prepared file.

Side by side in one run on the reference grid (128x256 at 0.25 degree, hourly), with the same fields:
- prepared: one NetCDF already on the target grid (`regrid: none`, units as stored);
- sources: ERA5-like monthly files (hourly, 0.25-degree points, latitude descending, ECMWF units,
  dewpoint instead of RH) and CAMS-like files (3-hourly, 0.75 degree, PM in kg m**-3, gases as kg kg**-1
  on model level 60, interpolated to the hourly store), so the build regrids, converts units (mixing
  ratio -> concentration with the air density), derives RH and aligns times.
Both builds run on the same running Dask cluster (the build's own settings), interleaved; medians.
Goal: sources / prepared <= 2x. Writes benchmarks/results/sources.json.

Usage: .venv/bin/python -m benchmarks.sources [--steps 240] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import save_result
from benchmarks.pipeline import bench_config
from pipeline.build import build_features
from pipeline.cluster import dask_client
from pipeline.config import PipelineConfig, load_pipeline_config
from pipeline.sample import conventions
from pipeline.sample.write import Points, cams_fields, era5_fields, point_axes
from tests.helpers import REPO, write_synthetic_source
from topoflow.config import read_yaml, write_yaml


def sources_config(prepared: PipelineConfig, root: Path) -> PipelineConfig:
    """The demo's multi-source recipe on the prepared config's grid and period, reading files under root."""
    demo = read_yaml(REPO / "configs" / "demo.yaml")["data"]
    data = prepared.data.model_dump(mode="json")
    data["sources"] = [s for s in demo["sources"] if s["name"] in ("era5", "cams")]
    data["sources"][0]["files"], data["sources"][1]["files"] = str(root / "era5_*.nc"), str(root / "cams_*.nc")
    data.update(derived={"rh": demo["derived"]["rh"]}, air_density=demo["air_density"], store=str(root / "sources.zarr"),
                gaps={"interpolate_max_hours": 3}, static=prepared.data.static.model_dump(mode="json"))
    data["sources"] += [s.model_dump(mode="json") for s in prepared.data.sources if s.name == "prepared_static"]
    path = root / "sources.yaml"
    write_yaml({"data": data, "build": prepared.build.model_dump(mode="json")}, path)
    return load_pipeline_config(path)


def write_downloads(prepared: PipelineConfig, root: Path) -> None:
    """ERA5-like and CAMS-like files holding the prepared file's fields (interpolated to their points)."""
    src = write_synthetic_source(prepared).sortby("latitude")
    mapping = {name: var.var for s in prepared.data.sources for name, var in s.variables.items()}
    domain, times = prepared.data.domain, pd.DatetimeIndex(src["time"].values)
    era5, cams = Points(domain, *point_axes(domain, 0.25)), Points(domain, *point_axes(domain, 0.75))
    for month, idx in pd.Series(np.arange(len(times)), index=times).groupby(times.to_period("M")):
        fields = {name: src[var].values[idx.values] for name, var in mapping.items() if "time" in src[var].dims}
        steps = [{k: v[i] for k, v in fields.items()} for i in range(len(idx))]
        conventions.write_era5(root / f"era5_{month}.nc", times[idx.values], era5.lat, era5.lon,
                               {k: np.stack([era5(era5_fields(s)[k]) for s in steps]) for k in ("u10", "v10", "t2m",
                                                                                                "d2m", "sp")})
        every3 = [i for i, t in enumerate(times[idx.values]) if t.hour % 3 == 0]
        conventions.write_cams(root / f"cams_{month}.nc", times[idx.values][every3], cams.lat, cams.lon,
                               {k: np.stack([cams(cams_fields(steps[i])[k]) for i in every3]) for k in
                                ("pm2p5", "pm10", "so2", "no2", "co", "go3")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240, help="hourly steps of both builds")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_sources_"))
    steps = args.steps - (args.steps - 1) % 3  # end on a 3-hourly CAMS time, or CAMS would not cover the period
    prepared = bench_config(root, steps, [])
    sources = sources_config(prepared, root)
    print(f"writing the prepared file and the ERA5-like / CAMS-like downloads in {root} ...")
    write_downloads(prepared, root)
    times: dict[str, list[float]] = {"prepared": [], "sources": []}
    with dask_client(prepared.build) as client:
        for r in range(args.repeats):
            for name, cfg in (("prepared", prepared), ("sources", sources)):
                t0 = time.perf_counter()
                build_features(cfg, scheduler=client.scheduler.address, overwrite=True, progress=False)
                times[name].append(time.perf_counter() - t0)
            print(f"repeat {r}: prepared {times['prepared'][-1]:.2f} s, sources {times['sources'][-1]:.2f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = lambda pattern: sum(p.stat().st_size for p in root.glob(pattern)) / 2**20  # noqa: E731
    result = {"grid": list(prepared.data.layout.grid), "steps": steps, "repeats": args.repeats,
              "seconds": times, "median_s": med, "sources_over_prepared": med["sources"] / med["prepared"],
              "goal_max_ratio": 2.0, "prepared_mb": round(mb("raw.nc"), 1),
              "era5_mb": round(mb("era5_*.nc"), 1), "cams_mb": round(mb("cams_*.nc"), 1)}
    save_result("sources", result)
    print(f"build from ERA5-like + CAMS-like files {med['sources']:.2f} s vs one prepared file {med['prepared']:.2f} s: "
          f"{result['sources_over_prepared']:.2f}x (goal <= 2x)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
