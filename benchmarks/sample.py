"""Wall time of `pipeline sample` on the demo grid (32x64, hourly) and the reference grid (128x256).

Both runs use `write_sample` exactly as the CLI does (terrain, simulation, the ERA5-like, CAMS-like and
population files), into a temporary folder. Reported: wall seconds, simulated hours (including the
10-day spin-up), ms per simulated hour, a per-year extrapolation, the cost ratio between the
grids (16x the cells), CPU seconds beside wall seconds (the machine is shared), and the peak resident memory of the process (bounded by the time-block
writes, not by the period). Writes benchmarks/results/sample.json.

Usage: .venv/bin/python -m benchmarks.sample [--demo-days 365] [--china-days 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks import save_result
from pipeline.config import load_pipeline_config
from pipeline.sample.write import SPINUP_DAYS, write_sample
from tests.helpers import REPO

HOURS_PER_YEAR = 8760


def measure(config: str, days: int, workdir: Path) -> dict:
    """Simulate `days` days hourly from 2018-01-01 on the config's grid; time it."""
    end = pd.Timestamp("2018-01-01") + pd.Timedelta(days=days) - pd.Timedelta(hours=1)
    overrides = [
        f"data.sample={{dir: {workdir / Path(config).stem}, seed: 0}}",
        "data.step_hours=1",
        f'data.splits={{train: {{start: "2018-01-01T00:00", end: "{end:%Y-%m-%dT%H:%M}"}}}}',
    ]
    cfg = load_pipeline_config(REPO / config, overrides)
    start, cpu_start = time.perf_counter(), time.process_time()
    path = write_sample(cfg, overwrite=True, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    hours = (days + SPINUP_DAYS) * 24
    d = cfg.data.domain
    return {
        "grid": [d.n_lat, d.n_lon],
        "days": days,
        "simulated_hours": hours,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),  # what wall time would be on an idle core; the machine is shared
        "ms_per_hour": round(1e3 * wall / hours, 3),
        "year_extrapolated_wall_s": round(wall / hours * (HOURS_PER_YEAR + SPINUP_DAYS * 24), 1),
        "year_extrapolated_cpu_s": round(cpu / hours * (HOURS_PER_YEAR + SPINUP_DAYS * 24), 1),
        "files_mb": round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-days", type=int, default=365)
    parser.add_argument("--china-days", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = measure("configs/demo.yaml", args.demo_days, Path(tmp))
        china = measure("configs/topoflow_china.yaml", args.china_days, Path(tmp))
    result = {
        "demo_32x64": demo,
        "china_128x256": china,
        "cost_ratio_128x256_vs_32x64_per_hour": round(china["ms_per_hour"] / demo["ms_per_hour"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, indent=2))
    save_result("sample", result)


if __name__ == "__main__":
    main()
