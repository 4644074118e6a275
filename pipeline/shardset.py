"""A shard set on disk: the manifest, shard verification, a shard's frames and their checks, full
validation and a printable summary.

The writer (`pipeline.shard`), the loader (`train.loader`) and `python -m pipeline inspect` all check
shards here, so "is this shard what the manifest says" has one answer.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pipeline.codec import FRAME_MEMBERS, FrameFormat, ShardFrames, frame_key
from pipeline.records import SCHEMA_VERSION, SHARD_VERSION, ManifestRecord, ShardEntry, ShardSpan, parse_record, \
    run_positions
from pipeline.shardplan import frames_of, to_runs
from topoflow.errors import ShardSetError, TopoFlowError
from topoflow.files import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
FIX = "run `python -m pipeline shard --config CONFIG` to (re)write the shard set"
_MEMBER_RE = re.compile(r"^(?P<split>[a-z]+)_(?P<index>\d{8})\.(?P<member>.+)$")
Frames = dict[int, dict[str, memoryview]]


def manifest_path(path: str | Path) -> Path:
    """Accept a shard directory or its manifest.json and return the manifest's path."""
    path = Path(path)
    return path if path.name == MANIFEST else path / MANIFEST


def shard_name(split: str, number: int) -> str:
    """File name of shard `number` of `split` (DESIGN.md: `{split}-NNNNNN.tar`)."""
    return f"{split}-{number:06d}.tar"


def read_manifest(path: str | Path) -> ManifestRecord:
    """The manifest of a shard set; a missing, malformed, foreign, other-schema or older-shard-version one is a
    ShardSetError naming the fix."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise ShardSetError(f"{mpath} does not exist: {FIX}")
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardSetError(f"{mpath} is not valid JSON ({exc}): {FIX}") from None
    if isinstance(raw, dict) and raw.get("schema_version") == SCHEMA_VERSION and \
            raw.get("shard_version") != SHARD_VERSION:
        raise ShardSetError(f"{mpath} describes shards of shard version {raw.get('shard_version', 1)}; this code "
                            f"reads version {SHARD_VERSION} (time frames without duplicated targets, samples "
                            "assembled by the loader): re-run `python -m pipeline shard --config CONFIG`, which "
                            "rewrites the shards from the same feature store")
    return parse_record(ManifestRecord, raw, str(mpath), ShardSetError, "rebuild the store (`python -m pipeline "
                        "build --config CONFIG --overwrite`), then re-shard it")


def write_manifest(root: Path, manifest: ManifestRecord) -> None:
    atomic_write_json(manifest_path(root), manifest.model_dump(mode="json"))


@dataclass(frozen=True)
class ShardProblem:
    """Why a shard does not match its manifest entry. `altered`: the size is right but the content is
    not (tampering, or a silent write error), or it holds members no writer puts there, which a loader
    must refuse rather than skip."""

    message: str
    altered: bool = False

    def __str__(self) -> str:
        return self.message


def shard_problem(path: Path, entry: ShardEntry, data: bytes | None = None) -> ShardProblem | None:
    """What is wrong with a shard file against its manifest entry (missing, truncated, altered), or None.
    `data`: the file's bytes when the caller has read them already (hashed in memory, not read again)."""
    if data is None and not path.is_file():
        return ShardProblem(f"{path.name}: missing")
    actual = path.stat().st_size if data is None else len(data)
    if actual != entry.bytes:
        return ShardProblem(f"{path.name}: {actual} bytes on disk, manifest says {entry.bytes} (truncated or "
                            "overwritten)")
    digest = sha256_file(path) if data is None else hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        return ShardProblem(f"{path.name}: sha256 differs from the manifest (the file changed after it was "
                            "written)", altered=True)
    return None


def parse_frames(data: bytes, split: str) -> tuple[Frames, list[str]]:
    """A shard's members grouped by frame (split position -> member -> a view of `data`), plus the member
    names that are not `{split}_{position:08d}.{member}` regular files or repeat one.

    One in-memory pass with tarfile: the loader reads a shard whole (it is small), and views avoid a
    copy per member.
    """
    view, frames, strange = memoryview(data), {}, []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            match = _MEMBER_RE.match(info.name)
            if not info.isreg() or match is None or match["split"] != split or \
                    match["member"] in frames.get(int(match["index"]), {}):  # foreign, or a second copy
                strange.append(info.name)
                continue
            if info.offset_data + info.size > len(data):
                raise tarfile.ReadError(f"member {info.name} runs past the end of the file")
            frames.setdefault(int(match["index"]), {})[match["member"]] = \
                view[info.offset_data: info.offset_data + info.size]
            tar.members = []  # keep memory flat
    return frames, strange


def frame_problems(frames: Frames, strange: list[str], span: ShardSpan, split: str, name: str) -> list[ShardProblem]:
    """Frames against the manifest's span: the frames listed, each with its kind's members. A member no
    writer puts there (e.g. a pickle) is `altered` (refused); a frame or member that is missing is not."""
    problems = [ShardProblem(f"{name}: unexpected member name {n!r}", altered=True) for n in strange]
    inputs = set(run_positions(span.samples))
    allowed = set(FRAME_MEMBERS["input"]) | set(FRAME_MEMBERS["target"])
    for position, members in sorted(frames.items()):
        unknown = sorted(set(members) - allowed)
        if unknown:
            problems.append(ShardProblem(
                f"{name}: frame {frame_key(split, position)} holds member(s) {unknown}; only {sorted(allowed)} are "
                "accepted (pickle-based members are never decoded)", altered=True))
    listed = run_positions(span.frames)
    if sorted(frames) != listed:
        problems.append(ShardProblem(f"{name}: holds frames {to_runs(sorted(frames))}, the manifest lists "
                                     f"{span.frames}"))
    wrong = [p for p in listed if p in frames and set(frames[p]) & allowed !=
             set(FRAME_MEMBERS["input" if p in inputs else "target"])]
    if wrong:
        problems.append(ShardProblem(f"{name}: {len(wrong)} frame(s) lack or mix members (input frames hold "
                                     f"{list(FRAME_MEMBERS['input'])}, target frames {list(FRAME_MEMBERS['target'])}), "
                                     f"e.g. position {wrong[0]}"))
    return problems


def _content_problems(path: Path, split: str, entry: ShardEntry, fmt: FrameFormat, n_times: int) -> list[str]:
    """Member-level checks of one tar (names, frames, members), the span against the plan rule, and one
    sample assembled and decoded (its input frame and its target frames)."""
    try:
        frames, strange = parse_frames(path.read_bytes(), split)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [f"{path.name}: unreadable tar ({exc})"]
    problems = [str(p) for p in frame_problems(frames, strange, entry, split, path.name)]
    expected = to_runs(frames_of(run_positions(entry.samples), fmt.lead_steps, n_times))
    if entry.frames != expected:
        problems.append(f"{path.name}: the manifest lists frames {entry.frames}, its samples need {expected}")
    if not problems and entry.samples:
        try:
            ShardFrames(frames, entry, split, str(path), fmt).sample(entry.samples[0][0])
        except TopoFlowError as exc:
            problems.append(str(exc))
    return problems


def _static_problems(root: Path, manifest: ManifestRecord) -> list[str]:
    problems = []
    for name, entry in manifest.static.items():
        path = root / entry.file
        if not path.is_file() or sha256_file(path) != entry.sha256:
            problems.append(f"static array {entry.file}: missing or its sha256 differs from the manifest")
            continue
        arr = np.load(path, allow_pickle=False)
        if list(arr.shape) != entry.shape or str(arr.dtype) != entry.dtype:
            problems.append(f"static array {entry.file}: {arr.shape} {arr.dtype}, manifest says "
                            f"{entry.shape} {entry.dtype}")
    return problems


def validate_shard_set(path: str | Path) -> list[str]:
    """Every problem of a shard set against its manifest (empty list = valid).

    Reads every byte: file sizes and sha256, tar member names (only the frame members, keys without
    dots), the frames each shard lists, split totals, one assembled sample per shard, the static arrays.
    """
    try:
        manifest = read_manifest(path)
    except ShardSetError as exc:
        return [str(exc)]
    root = manifest_path(path).parent
    fmt = FrameFormat.of(manifest)
    problems = [] if manifest.complete else [f"the shard set is incomplete (writing was interrupted): {FIX}"]
    for split, record in manifest.splits.items():
        for entry in record.shards:
            problem = shard_problem(root / entry.name, entry)
            problems.extend([str(problem)] if problem else
                            _content_problems(root / entry.name, split, entry, fmt, record.n_times))
        samples = [p for entry in record.shards for p in run_positions(entry.samples)]
        if samples != sorted(set(samples)):
            problems.append(f"split {split}: shards hold samples out of order or twice")
        if record.complete and record.n_samples + record.n_skipped != record.n_times:
            problems.append(f"split {split}: {record.n_samples} samples + {record.n_skipped} skipped "
                            f"!= {record.n_times} input times")
    return problems + _static_problems(root, manifest)


def dynamic_bytes_per_step(manifest: ManifestRecord) -> int:
    """Bytes of one time step of the dynamic fields (float32): the yardstick of a shard set's size."""
    h, w = manifest.store.layout.grid
    return 4 * len(manifest.store.names("dynamic")) * h * w


def summarize_shard_set(path: str | Path) -> str:
    """A human-readable summary of a shard set (from the manifest only; cheap)."""
    manifest = read_manifest(path)
    store = manifest.store
    lines = [
        f"shard set {manifest_path(path).parent} (schema {manifest.schema_version}, shard version "
        f"{manifest.shard_version}, {'complete' if manifest.complete else 'INCOMPLETE'}) from {manifest.store_path}",
        f"  grid {store.layout.grid[0]}x{store.layout.grid[1]}, patch {store.layout.patch_size}, "
        f"{store.layout.n_tokens} tokens, regions {store.layout.regions[0]}x{store.layout.regions[1]}",
        f"  variables ({len(store.variables)}): {', '.join(store.variable_names)}",
        f"  targets: {', '.join(store.targets)}; leads (h): {store.leads_h} = {manifest.lead_steps} steps of "
        f"{store.step_hours} h",
        *(f"  {kind} frames: {', '.join(members)}" for kind, members in manifest.frame_members.items()),
    ]
    per_step = dynamic_bytes_per_step(manifest)
    for split, record in manifest.splits.items():
        size = sum(s.bytes for s in record.shards)
        frames = sum(len(run_positions(s.frames)) for s in record.shards)
        ratio = f"{size / (per_step * record.n_times):.2f}x" if record.n_times else "-"
        reasons = ", ".join(f"{len(keys)} {why}" for why, keys in record.skipped.items() if keys) or "none"
        lines.append(f"  {split}: {record.n_samples} samples in {len(record.shards)} shards, {frames} frames "
                     f"({size / 2**20:.1f} MiB, {ratio} the dynamic fields of its {record.n_times} time steps), "
                     f"skipped: {reasons}" + ("" if record.complete else ", INCOMPLETE"))
    lines.append(f"  static arrays: {', '.join(manifest.static)}")
    return "\n".join(lines)
