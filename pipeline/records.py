"""The typed records handed from stage to stage: the store's root attrs and the shard manifest.

`StoreRecord` is written by the build as the root attrs of features.zarr (one JSON-able pydantic
model); the shard writer copies it, unchanged, into `ManifestRecord.store`; the trainer reads the
manifest. What the config determines is compared in one place, `StoreRecord.mismatch`, which names
each differing key, so build, shard, fit, evaluate and resume refuse mismatches the same way.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.config import DataConfig, DomainConfig, TimeRange, VariableKind
from topoflow.config import Strict
from topoflow.errors import TopoFlowError
from topoflow.layout import PatchLayout

SCHEMA_VERSION = 3
SHARD_VERSION = 2  # 1: one tar entry per sample with its targets copied in; 2: frames, samples assembled by the loader
Record = TypeVar("Record", bound=BaseModel)
BuildState = Literal["building", "complete"]
# facts a config determines, compared by `mismatch`; a checkpoint cares only about the model-shaping ones
CONFIG_FACTS = ("domain", "step_hours", "layout", "sectors", "calm_threshold", "variables", "targets", "wind",
                "leads_h", "splits")
MODEL_FACTS = ("domain", "layout", "variables", "targets", "leads_h")


def parse_record(model: type[Record], raw: Any, where: str, error: type[TopoFlowError], fix: str) -> Record:
    """A schema-3 record from JSON data; another schema version or damaged data is `error` naming `fix`."""
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise error(f"{where} has schema version {version}, this code reads {SCHEMA_VERSION}: {fix}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise error(f"{where} is damaged ({exc.error_count()} problem(s), first: {first['loc']}: {first['msg']}): "
                    f"{fix}") from None


class VariableRecord(Strict):
    """A model input variable as stored: name, kind and units, plus the CF names the source gave it."""

    name: str
    kind: VariableKind
    units: str
    standard_name: str | None = None
    long_name: str | None = None


class SourceRecord(Strict):
    """One source the store was built from: how many files, how it was regridded, its content fingerprint."""

    name: str
    files: int
    regrid: str
    fingerprint: str


class Provenance(Strict):
    """Where the store came from: sources, conversions, the full data recipe, build settings, versions."""

    sources: list[SourceRecord]
    conversions: dict[str, str] = {}  # variable -> how its units were converted (mixing ratio -> concentration ...)
    recipe: dict[str, Any]
    build: dict[str, Any]
    config_hash: str
    package_version: str
    git: str | None = None
    versions: dict[str, str] = {}


class StoreRecord(Strict):
    """Root attrs of features.zarr (DESIGN.md "features.zarr"), schema 3."""

    Conventions: str = "CF-1.8"
    title: str = "TopoFlow feature store: dynamic inputs, statics, patch fields, wind scan orders, statistics"
    history: str = ""
    schema_version: Literal[3] = SCHEMA_VERSION
    domain: DomainConfig
    step_hours: int
    layout: PatchLayout
    sectors: int
    calm_threshold: float
    variables: list[VariableRecord]
    targets: list[str]
    wind: tuple[str, str]
    leads_h: list[int]
    splits: dict[str, TimeRange]
    change_std: list[list[float | None]] | None = None  # (n_leads, P) train-period spread of target changes
    change_pairs: list[int] | None = None  # (t, t + lead) pairs behind each lead's change_std
    missing_times: list[str] = []  # store times some source lacks: gaps, valid False
    filled_times: list[str] = []  # store times interpolated across a short gap (data.gaps)
    provenance: Provenance
    build_state: BuildState = "building"

    @staticmethod
    def facts(data: DataConfig) -> dict[str, Any]:
        """The record fields a data config determines (JSON values), keyed like the record."""
        return {
            "domain": data.domain.model_dump(mode="json"),
            "step_hours": data.step_hours,
            "layout": data.layout.model_dump(mode="json"),
            "sectors": data.sectors,
            "calm_threshold": data.calm_threshold,
            "variables": [{"name": v.name, "kind": v.kind, "units": v.units} for v in data.variables],
            "targets": list(data.targets),
            "wind": list(data.wind),
            "leads_h": list(data.leads_h),
            "splits": {k: r.model_dump(mode="json") for k, r in data.splits.items()},
        }

    @classmethod
    def create(cls, data: DataConfig, provenance: Provenance, variables: list[VariableRecord]) -> "StoreRecord":
        """The record of a new build: the config's facts, the sources' CF names, provenance and history."""
        facts = {**cls.facts(data), "variables": [v.model_dump() for v in variables]}
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        history = f"{now}: python -m pipeline build (topoflow {provenance.package_version})"
        return cls.model_validate({**facts, "provenance": provenance, "history": history})

    def mismatch(self, data: DataConfig, keys: tuple[str, ...] = CONFIG_FACTS) -> list[str]:
        """One line per fact that differs between this record and `data`, e.g. `data.patch_size: ...`."""
        mine = self.model_dump(mode="json", include=set(keys))
        mine["variables"] = [{k: v[k] for k in ("name", "kind", "units")} for v in mine.get("variables", [])]
        wanted = self.facts(data)
        lines = []
        for key in keys:
            if mine[key] != wanted[key]:
                label = f"data.{key}" if key != "layout" else "data.patch_size/regions/domain"
                detail = _variable_changes(mine[key], wanted[key]) if key == "variables" else \
                    f"stored {mine[key]}, config {wanted[key]}"
                lines.append(f"{label}: {detail}")
        return lines

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str, error: type[TopoFlowError]) -> "StoreRecord":
        """Parse a store's root attrs; another schema or a foreign group is `error` naming the fix."""
        if "schema_version" not in attrs:
            raise error(f"{where} is not a feature store written by `python -m pipeline build`: rebuild it")
        return parse_record(cls, attrs, where, error, "rebuild it with `python -m pipeline build --config CONFIG "
                                                      "--overwrite` (then re-shard)")

    def names(self, kind: VariableKind) -> list[str]:
        return [v.name for v in self.variables if v.kind == kind]

    @property
    def variable_names(self) -> list[str]:
        """Every model input variable, in the model's channel order."""
        return [v.name for v in self.variables]

    @property
    def target_index(self) -> list[int]:
        """Position of each target among the dynamic variables (`fields`' var axis)."""
        dynamic = self.names("dynamic")
        return [dynamic.index(t) for t in self.targets]

    @property
    def units(self) -> dict[str, str]:
        return {v.name: v.units for v in self.variables}


def _variable_changes(stored: list[dict[str, str]], wanted: list[dict[str, str]]) -> str:
    """Which variables only the store has, only the config has, or differ in kind/units or order."""
    show = lambda v: f"{v['name']} ({v['kind']}, {v['units']})"  # noqa: E731
    before, after = {v["name"]: v for v in stored}, {v["name"]: v for v in wanted}
    parts = [f"only stored: {', '.join(show(v) for n, v in before.items() if n not in after)}",
             f"only in the config: {', '.join(show(v) for n, v in after.items() if n not in before)}",
             "changed: " + ", ".join(f"{show(before[n])} -> {show(v)}" for n, v in after.items()
                                     if n in before and before[n] != v)]
    described = "; ".join(p for p in parts if not p.endswith(": "))
    return described or f"order stored {list(before)}, config {list(after)}"


Runs = list[tuple[int, int]]  # sorted, disjoint [start, stop) runs of split positions


def run_positions(runs: Runs) -> list[int]:
    """The split positions a list of [start, stop) runs covers, in order."""
    return [p for start, stop in runs for p in range(start, stop)]


class ShardSpan(Strict):
    """What one shard holds (DESIGN.md "Shards", shard version 2): its samples (input times, as split
    positions) and its frames (the samples' input frames plus the target-only frames of t + lead that
    lie inside the split), both as [start, stop) runs. A frame that is a sample is an input frame."""

    samples: Runs
    frames: Runs

    @property
    def count(self) -> int:
        return sum(stop - start for start, stop in self.samples)

    @property
    def stop(self) -> int:
        """One past the last sample: a rerun decides the positions from here on again."""
        return self.samples[-1][1] if self.samples else 0


class ShardEntry(ShardSpan):
    """One finished shard: its span, file name, bytes and sha256."""

    name: str
    bytes: int
    sha256: str


class SplitRecord(Strict):
    """One split of a shard set: its input times, the ones skipped by reason, and its shards."""

    n_times: int = 0
    complete: bool = False
    skipped: dict[str, list[str]] = {}
    shards: list[ShardEntry] = []

    @property
    def n_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def n_skipped(self) -> int:
        return sum(len(keys) for keys in self.skipped.values())


class StaticEntry(Strict):
    """A static array beside the manifest (.npy, no pickle)."""

    file: str
    shape: list[int]
    dtype: str
    sha256: str


class Statistics(Strict):
    """Train-period mean/std per dynamic variable, grid mean/std per static variable (float64)."""

    mean: list[float]
    std: list[float]
    static_mean: list[float]
    static_std: list[float]


class ShardPlan(Strict):
    """What the shards were cut from and how: equal plans mean reusable shards."""

    store_fingerprint: str
    max_count: int
    max_size: int


class ManifestRecord(Strict):
    """manifest.json (DESIGN.md "Shards"): the store's record, copied, plus the shards written from it.

    `lead_steps` (each lead in store steps) and `frame_members` (the members of an `input` and of a
    `target` frame) are written here once, so the loader assembles samples from what the writer did,
    never from a re-derivation."""

    schema_version: Literal[3] = SCHEMA_VERSION
    shard_version: Literal[2] = SHARD_VERSION
    store_path: str
    store: StoreRecord
    plan: ShardPlan
    lead_steps: list[int]
    frame_members: dict[str, list[str]]
    statistics: Statistics
    static: dict[str, StaticEntry]
    splits: dict[str, SplitRecord]
    complete: bool = False
