"""Typed, validated configuration of the data side: source, grid, variables, time, splits, build, shards.

The pipeline validates the sections it owns (`data`, `build`, `shard`); `train.config` validates the
rest of the same file. Derived facts (the patch layout, the period, the variable kinds) are
properties here, computed in one place.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from dask.utils import parse_timedelta
from pydantic import Field, field_validator, model_validator

from pipeline.recipe import Recipe
from topoflow.config import Strict, load_sections
from topoflow.layout import PatchLayout, check_divisible

POLLUTANTS = ("pm25", "pm10", "so2", "no2", "co", "o3")
VariableKind = Literal["dynamic", "static", "coordinate"]
COORDINATES = ("lat2d", "lon2d")  # pipeline.features.COORDINATE_LAYERS defines them


class VariableSpec(Strict):
    """One model input variable and where it comes from.

    kind: `dynamic` (time, lat, lon; stored in `fields`), `static` (lat, lon; stored once in `static`)
    or `coordinate` (lat2d / lon2d, derived from the grid, never stored). `units` are the units the
    store holds it in: the build converts from the source's units. `source` is the recipe name that
    provides it (`pipeline.recipe`), by default its own name.
    """

    name: str
    units: str
    kind: VariableKind = "dynamic"
    source: str | None = None

    @model_validator(mode="after")
    def _coordinates(self) -> "VariableSpec":
        if self.kind == "coordinate" and self.name not in COORDINATES:
            raise ValueError(f"variable {self.name!r}: kind 'coordinate' only exists for {COORDINATES}")
        return self

    @property
    def recipe_name(self) -> str:
        return self.source or self.name


class DomainConfig(Strict):
    """Regular lat/lon grid: cell centres from (lat_south, lon_west) + resolution/2, n_lat x n_lon cells."""

    lat_south: float = Field(ge=-90, le=90)
    lon_west: float = Field(ge=-360, le=360)
    resolution: float = Field(gt=0, description="degrees")
    n_lat: int = Field(gt=0)
    n_lon: int = Field(gt=0)

    def latitudes(self) -> np.ndarray:
        """Ascending cell-centre latitudes (float64)."""
        return self.lat_south + (np.arange(self.n_lat) + 0.5) * self.resolution

    def longitudes(self) -> np.ndarray:
        """Ascending cell-centre longitudes (float64)."""
        return self.lon_west + (np.arange(self.n_lon) + 0.5) * self.resolution


class TimeRange(Strict):
    """Inclusive [start, end] in ISO dates/datetimes."""

    start: dt.datetime
    end: dt.datetime

    @model_validator(mode="after")
    def _ordered(self) -> "TimeRange":
        if self.end < self.start:
            raise ValueError(f"time range end {self.end} is before start {self.start}")
        return self

    def covers(self, times: np.ndarray | pd.DatetimeIndex) -> np.ndarray:
        """Boolean mask of the `times` (datetime64) inside [start, end], both ends included."""
        times = np.asarray(times, dtype="datetime64[ns]")
        return (times >= np.datetime64(self.start)) & (times <= np.datetime64(self.end))


class SampleConfig(Strict):
    """The embedded sample written by `python -m pipeline sample` over data.period: ERA5-like and
    CAMS-like files (and statics) under `dir`, in the real downloads' conventions."""

    dir: Path
    seed: int = 0


class DataConfig(Recipe):
    """What the data is: sources recipe, grid, time step, variables, targets, leads, patches, regions, splits."""

    store: Path
    shards: Path
    domain: DomainConfig
    step_hours: int = Field(default=1, gt=0, description="the common time step of the store, in hours")
    sample: SampleConfig | None = None
    variables: list[VariableSpec]
    targets: list[str] = list(POLLUTANTS)
    leads_h: list[int] = [12, 24, 48, 96]
    patch_size: int = Field(default=2, gt=0)
    regions: tuple[int, int] = (32, 32)
    sectors: int = Field(default=16, gt=0)
    calm_threshold: float = Field(default=0.5, ge=0, description="m/s; below it a region keeps raster order")
    wind: tuple[str, str] = ("u", "v")
    splits: dict[Literal["train", "val", "test"], TimeRange]

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        names = [v.name for v in self.variables]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variables listed twice: {dup}")
        for role, wanted in (("target", self.targets), ("wind component", self.wind)):
            for name in wanted:
                if name not in self.dynamic_names:
                    raise ValueError(f"{role} {name!r} is not among the dynamic input variables {self.dynamic_names}")
        if any(lead <= 0 for lead in self.leads_h) or len(set(self.leads_h)) != len(self.leads_h):
            raise ValueError(f"leads_h must be distinct positive hours, got {self.leads_h}")
        for lead in self.leads_h:
            if lead % self.step_hours:
                raise ValueError(f"lead {lead} h is not a multiple of data.step_hours={self.step_hours}")
        check_divisible((self.domain.n_lat, self.domain.n_lon), self.patch_size, self.regions)
        if "train" not in self.splits:
            raise ValueError("splits must define `train` (statistics are computed over it)")
        missing = [f"{v.name} (from {v.recipe_name!r})" for v in self.variables
                   if v.kind != "coordinate" and v.recipe_name not in self.pool]
        if missing:
            raise ValueError(f"variables {missing} come from no source, derived variable or built-in: add them to a "
                             f"source's `variables`, to `derived`, or set their `source`; known: {self.pool}")
        return self

    @property
    def layout(self) -> PatchLayout:
        return PatchLayout(grid=(self.domain.n_lat, self.domain.n_lon), patch_size=self.patch_size,
                           regions=self.regions)

    @property
    def period(self) -> TimeRange:
        """The store's time span: from the earliest split start to the latest split end."""
        return TimeRange(start=min(r.start for r in self.splits.values()), end=max(r.end for r in self.splits.values()))

    def times(self) -> pd.DatetimeIndex:
        """Every time step of the store, data.step_hours apart."""
        return pd.date_range(self.period.start, self.period.end, freq=f"{self.step_hours}h")

    def names_of(self, kind: VariableKind) -> list[str]:
        return [v.name for v in self.variables if v.kind == kind]

    @property
    def variable_names(self) -> list[str]:
        """Every model input variable, in the model's channel order."""
        return [v.name for v in self.variables]

    @property
    def dynamic_names(self) -> list[str]:
        return self.names_of("dynamic")


def slurm_seconds(walltime: str) -> int:
    """Seconds in a SLURM time limit, in any form `sbatch --time` takes: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", walltime.strip())
    if match is None:
        raise ValueError(f"walltime {walltime!r} is not a SLURM time limit: write HH:MM:SS (e.g. 02:00:00) or "
                         "D-HH:MM:SS")
    days, parts = match[1], [int(p) for p in match[2].split(":")]
    if days is None:  # M, M:S, H:M:S
        parts = parts if len(parts) == 3 else [0, *parts, 0][:3]
    else:  # D-H, D-H:M, D-H:M:S
        parts = (parts + [0, 0])[:3]
    hours, minutes, seconds = parts
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


class SlurmConfig(Strict):
    """dask-jobqueue SLURMCluster settings for `build --cluster slurm`: `jobs` SLURM jobs of `processes`
    single-threaded Dask worker processes each.

    Example (`build.slurm` in the YAML): {queue: cpu, account: proj123, cores: 16, processes: 16,
    memory: 64GB, walltime: "02:00:00", jobs: 4, interface: ib0, local_directory: $TMPDIR,
    job_script_prologue: ["module load netcdf", "source .venv/bin/activate"], worker_lifetime: 110m}.
    A failed sbatch is reported at once; no worker within `wait_timeout_s` is an error.
    """

    queue: str | None = Field(default=None, description="SLURM partition (#SBATCH -p); None = site default")
    account: str | None = Field(default=None, description="SLURM account (#SBATCH -A); None = user default")
    cores: int = Field(default=8, gt=0, description="cores per job")
    processes: int = Field(default=8, gt=0, description="Dask worker processes per job (HDF5 reads lock per process)")
    memory: str = Field(default="32GB", description="memory per job, e.g. 64GB")
    walltime: str = Field(default="02:00:00", description="time limit per job (#SBATCH -t), HH:MM:SS or D-HH:MM:SS")
    jobs: int = Field(default=2, gt=0, description="SLURM jobs to keep running (a job that ends is resubmitted)")
    interface: str | None = Field(
        default=None, description="network interface of the scheduler and the workers, e.g. ib0 (InfiniBand) when "
                                  "workers cannot reach the scheduler on the default one; None = dask-jobqueue config")
    local_directory: str | None = Field(
        default=None, description="node-local scratch where workers spill, e.g. $TMPDIR (expanded on the node); "
                                  "None = dask-jobqueue config, else Dask's temporary directory")
    job_script_prologue: list[str] = Field(
        default=[], description="shell lines the job runs before the workers start, e.g. `module load netcdf`, "
                                "`source /path/.venv/bin/activate`; empty = dask-jobqueue config")
    worker_lifetime: str | None = Field(
        default=None, description="e.g. 55m for a 1-hour walltime: workers retire gracefully after this long "
                                  "(± lifetime_stagger), so the job ends before SLURM kills it and is resubmitted; "
                                  "None = workers run until the walltime kills them")
    lifetime_stagger: str = Field(default="4m", description="random spread of worker_lifetime per worker, so a "
                                                            "job's workers do not all retire at once")
    wait_timeout_s: float = Field(default=600, gt=0, description="seconds to wait for the first worker to join "
                                                                 "before the build fails (queued jobs included)")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        slurm_seconds(value)
        return value

    @field_validator("worker_lifetime", "lifetime_stagger")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        try:
            seconds = None if value is None else parse_timedelta(value)
        except (KeyError, ValueError):
            raise ValueError(f"{value!r} is not a duration: write e.g. 55m, 4m or 1.5h") from None
        if seconds is not None and seconds <= 0:
            raise ValueError(f"{value!r} must be a positive duration, e.g. 55m")
        return value

    @model_validator(mode="after")
    def _fits(self) -> "SlurmConfig":
        if self.cores % self.processes:
            raise ValueError(f"slurm.cores {self.cores} must be a multiple of slurm.processes {self.processes}")
        return self

    @model_validator(mode="after")
    def _retires_in_time(self) -> "SlurmConfig":
        if self.worker_lifetime is None:
            return self
        lifetime, stagger = parse_timedelta(self.worker_lifetime), parse_timedelta(self.lifetime_stagger)
        if stagger >= lifetime:
            raise ValueError(f"slurm.lifetime_stagger {self.lifetime_stagger} must be shorter than "
                             f"slurm.worker_lifetime {self.worker_lifetime}: lower it (e.g. 4m for 55m)")
        if lifetime + stagger >= slurm_seconds(self.walltime):
            raise ValueError(
                f"slurm.worker_lifetime {self.worker_lifetime} + lifetime_stagger {self.lifetime_stagger} does not end "
                f"before the walltime {self.walltime}, so SLURM would kill workers instead of them retiring: set "
                "worker_lifetime to the walltime minus the stagger minus a few minutes (55m with 4m for 01:00:00)")
        return self

    @property
    def worker_extra_args(self) -> list[str]:
        """dask-jobqueue's walltime pattern: retire each worker before the job's time limit."""
        if self.worker_lifetime is None:
            return []
        return ["--lifetime", self.worker_lifetime, "--lifetime-stagger", self.lifetime_stagger]


class BuildConfig(Strict):
    """How `python -m pipeline build` runs: chunking, cluster, Zarr format."""

    time_chunk: int = Field(default=24, gt=0, description="time steps per Zarr chunk = per build task")
    zarr_format: Literal[2, 3] = 3
    cluster: Literal["local", "slurm"] = Field(default="local", description="where workers run unless --scheduler "
                                                                         "or --scheduler-file")
    n_workers: int | None = Field(
        default=None, description="LocalCluster worker processes; None = one per core (HDF5 reads lock per process)")
    threads_per_worker: int = Field(default=1, gt=0, description="threads per LocalCluster worker")
    processes: bool = Field(default=True, description="LocalCluster worker processes; False = threads in this "
                                                     "process (debugging, tiny stores: HDF5 reads share one lock)")
    memory_limit: str = "auto"
    compressor: Literal["lz4", "zstd"] = Field(default="lz4", description="Blosc codec: lz4 is fastest to read back")
    compressor_level: int = Field(default=5, ge=0, le=9)
    slurm: SlurmConfig = SlurmConfig()


class ShardConfig(Strict):
    """How `python -m pipeline shard` cuts the store into WebDataset tar files."""

    max_count: int = Field(default=256, gt=0, description="samples per shard at most; each shard also holds the "
                           "target-only frames of its longest lead, so larger shards cost fewer bytes per step")
    max_size: int = Field(default=1 << 30, gt=0, description="bytes per shard at most")


class PipelineConfig(Strict):
    """The sections the pipeline owns; other sections are checked by name only."""

    data: DataConfig
    build: BuildConfig = BuildConfig()
    shard: ShardConfig = ShardConfig()


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load the pipeline's sections of an experiment file (paths are relative to the working dir)."""
    return load_sections(PipelineConfig, path, overrides, ("data", "build", "shard"))
