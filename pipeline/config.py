"""Typed, validated configuration of the data side (source, grid, variables, splits, build, shards).

One YAML file describes a whole experiment (sections `data`, `build`, `shard`, `model`, `train`,
`evaluate`, `ablate`). The pipeline validates the sections it owns and only checks that the other
top-level keys are known; `train.config` validates the rest. Unknown keys and wrong types are
errors that name the key (pydantic, `extra="forbid"`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TOP_LEVEL_SECTIONS = ("data", "build", "shard", "model", "train", "evaluate", "ablate")
POLLUTANTS = ("pm25", "pm10", "so2", "no2", "co", "o3")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key and the fix."""


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class VariableSpec(Strict):
    """How one model variable is read from the raw source.

    kind: `dynamic` (time, latitude, longitude), `static` (latitude, longitude; broadcast over time in
    `fields`) or `coordinate` (lat2d / lon2d derived from the grid, no source variable).
    """

    name: str
    source: str | None = None
    units: str
    kind: Literal["dynamic", "static", "coordinate"] = "dynamic"

    @model_validator(mode="after")
    def _source_required(self) -> "VariableSpec":
        if self.kind != "coordinate" and not self.source:
            raise ValueError(f"variable {self.name!r}: `source` is required for kind {self.kind!r}")
        if self.kind == "coordinate" and self.name not in ("lat2d", "lon2d"):
            raise ValueError(f"variable {self.name!r}: kind 'coordinate' only exists for lat2d and lon2d")
        return self


class DomainConfig(Strict):
    """Regular lat/lon grid: cell centres from (lat_south, lon_west) + resolution/2, n_lat x n_lon cells."""

    lat_south: float = Field(ge=-90, le=90)
    lon_west: float = Field(ge=-360, le=360)
    resolution: float = Field(gt=0, description="degrees")
    n_lat: int = Field(gt=0)
    n_lon: int = Field(gt=0)

    def latitudes(self) -> list[float]:
        """Ascending cell-centre latitudes."""
        return [self.lat_south + (i + 0.5) * self.resolution for i in range(self.n_lat)]

    def longitudes(self) -> list[float]:
        """Ascending cell-centre longitudes."""
        return [self.lon_west + (j + 0.5) * self.resolution for j in range(self.n_lon)]


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
    """The embedded simulated source written by `python -m pipeline sample`."""

    period: TimeRange
    step_hours: int = Field(default=1, gt=0)
    seed: int = 0


class StaticSpec(Strict):
    """Static fields of the source (no time dim)."""

    elevation: str = "z_sfc"
    elevation_units: str = "m"
    loss_mask: str | None = "land_sea_mask"


class DataConfig(Strict):
    """What the data is: source, grid, variables, targets, leads, patches, regions, splits."""

    raw: Path
    store: Path
    shards: Path
    domain: DomainConfig
    sample: SampleConfig
    variables: list[VariableSpec]
    static: StaticSpec = StaticSpec()
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
        for t in self.targets:
            if t not in names:
                raise ValueError(f"target {t!r} is not among the input variables {names}")
        for w in self.wind:
            if w not in names:
                raise ValueError(f"wind component {w!r} is not among the input variables {names}")
        if any(lead <= 0 for lead in self.leads_h) or len(set(self.leads_h)) != len(self.leads_h):
            raise ValueError(f"leads_h must be distinct positive hours, got {self.leads_h}")
        for lead in self.leads_h:
            if lead % self.sample.step_hours:
                raise ValueError(f"lead {lead} h is not a multiple of the time step {self.sample.step_hours} h")
        p, (ry, rx) = self.patch_size, self.regions
        d = self.domain
        if d.n_lat % p or d.n_lon % p:
            raise ValueError(
                f"grid {d.n_lat}x{d.n_lon} is not divisible by patch_size {p}: choose a patch size that divides both"
            )
        gh, gw = d.n_lat // p, d.n_lon // p
        if gh % ry or gw % rx:
            raise ValueError(
                f"patch grid {gh}x{gw} (grid {d.n_lat}x{d.n_lon} / patch {p}) is not divisible by regions "
                f"{ry}x{rx}: choose regions that divide the patch grid"
            )
        if "train" not in self.splits:
            raise ValueError("splits must define `train` (statistics are computed over it)")
        return self

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(patch rows, patch cols)."""
        return self.domain.n_lat // self.patch_size, self.domain.n_lon // self.patch_size

    @property
    def n_tokens(self) -> int:
        gh, gw = self.patch_grid
        return gh * gw

    @property
    def variable_names(self) -> list[str]:
        return [v.name for v in self.variables]

    @property
    def target_index(self) -> list[int]:
        """Position of each target among the input variables (in `fields`' var axis)."""
        return [self.variable_names.index(t) for t in self.targets]


class SlurmConfig(Strict):
    """dask-jobqueue SLURMCluster settings for `build --cluster slurm` (one Dask worker process per job).

    Example (`build.slurm` in the YAML): {queue: cpu, account: proj123, cores: 16, memory: 64GB,
    walltime: "02:00:00", jobs: 4}.
    """

    queue: str | None = Field(default=None, description="SLURM partition (#SBATCH -p); None = site default")
    account: str | None = Field(default=None, description="SLURM account (#SBATCH -A); None = user default")
    cores: int = Field(default=8, gt=0, description="cores per job = threads of its Dask worker")
    memory: str = Field(default="32GB", description="memory per job, e.g. 64GB")
    walltime: str = Field(default="02:00:00", description="HH:MM:SS per job")
    jobs: int = Field(default=2, gt=0, description="SLURM jobs (= Dask workers) to start")


class BuildConfig(Strict):
    """How `python -m pipeline build` runs: chunking, cluster, Zarr format."""

    time_chunk: int = Field(default=24, gt=0, description="time steps per Zarr chunk = per resumable block")
    zarr_format: Literal[2, 3] = 3
    cluster: Literal["local", "slurm"] = Field(default="local", description="where workers run unless --scheduler")
    n_workers: int | None = Field(
        default=1, description="LocalCluster worker processes: one, whose threads share a block (no transfers); None = per core"
    )
    threads_per_worker: int | None = Field(default=None, description="threads per worker; None = all cores")
    processes: bool = Field(default=True, description="LocalCluster worker processes (False = threads in-process)")
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass --config with an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections {TOP_LEVEL_SECTIONS}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown top-level key(s) {unknown}; allowed: {TOP_LEVEL_SECTIONS}")
    return raw


def add_override_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """The `--set KEY=VALUE` option every command shares (collected in `args.overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable; value parsed as YAML)")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides (value parsed as YAML) to a raw config dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        if keys[0] not in TOP_LEVEL_SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {keys[0]!r}; allowed: {TOP_LEVEL_SECTIONS}")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(value)
    return raw


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key, e.g. `data.patch_size: Input should be ...`."""
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def validate_section(model: type[BaseModel], raw: dict[str, Any], source: str, prefix: str = "") -> Any:
    """Validate raw data against a model, turning pydantic errors into a ConfigError naming keys."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        msg = format_validation_error(exc, source)
        if prefix:
            msg = msg.replace("\n  ", f"\n  {prefix}")
        raise ConfigError(msg) from None


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load the pipeline's sections of an experiment file (paths are relative to the working dir)."""
    raw = apply_overrides(read_yaml(path), overrides)
    owned = {k: raw[k] for k in ("data", "build", "shard") if k in raw}
    return validate_section(PipelineConfig, owned, str(path))


def config_hash(config: BaseModel) -> str:
    """Stable short hash of a config section, recorded in provenance to detect changed configs."""
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
