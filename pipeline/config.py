"""Typed, validated configuration of the data side: source, grid, variables, time, splits, build, shards.

The pipeline validates the sections it owns (`data`, `build`, `shard`); `train.config` validates the
rest of the same file. Derived facts (the patch layout, the period, the variable kinds) are
properties here, computed in one place.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

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


class SlurmConfig(Strict):
    """dask-jobqueue SLURMCluster settings for `build --cluster slurm` (one Dask worker process per job).

    Example (`build.slurm` in the YAML): {queue: cpu, account: proj123, cores: 16, memory: 64GB,
    walltime: "02:00:00", jobs: 4}.
    """

    queue: str | None = Field(default=None, description="SLURM partition (#SBATCH -p); None = site default")
    account: str | None = Field(default=None, description="SLURM account (#SBATCH -A); None = user default")
    cores: int = Field(default=8, gt=0, description="cores per job")
    processes: int = Field(default=8, gt=0, description="Dask worker processes per job (HDF5 reads lock per process)")
    memory: str = Field(default="32GB", description="memory per job, e.g. 64GB")
    walltime: str = Field(default="02:00:00", description="HH:MM:SS per job")
    jobs: int = Field(default=2, gt=0, description="SLURM jobs to start")

    @model_validator(mode="after")
    def _fits(self) -> "SlurmConfig":
        if self.cores % self.processes:
            raise ValueError(f"slurm.cores {self.cores} must be a multiple of slurm.processes {self.processes}")
        return self


class BuildConfig(Strict):
    """How `python -m pipeline build` runs: chunking, cluster, Zarr format."""

    time_chunk: int = Field(default=24, gt=0, description="time steps per Zarr chunk = per build task")
    zarr_format: Literal[2, 3] = 3
    cluster: Literal["local", "slurm"] = Field(default="local", description="where workers run unless --scheduler")
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

    max_count: int = Field(default=256, gt=0, description="samples per shard at most")
    max_size: int = Field(default=1 << 30, gt=0, description="bytes per shard at most")


class PipelineConfig(Strict):
    """The sections the pipeline owns; other sections are checked by name only."""

    data: DataConfig
    build: BuildConfig = BuildConfig()
    shard: ShardConfig = ShardConfig()


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load the pipeline's sections of an experiment file (paths are relative to the working dir)."""
    return load_sections(PipelineConfig, path, overrides, ("data", "build", "shard"))
