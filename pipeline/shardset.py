"""A shard set on disk: manifest schema, integrity checks, validation and a printable summary.

The writer (`pipeline.shard`), the loader (`train.data`) and `python -m pipeline inspect` all meet
here, so the manifest's layout and the list of allowed tar members are defined once.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2  # 2: stats.change_std / change_pairs (per-lead spread of target changes)
SPLITS = ("train", "val", "test")
# The only members a sample may hold: everything is .npy (decoded with allow_pickle=False) or .json.
SAMPLE_MEMBERS = ("input.npy", "target.npy", "scan_order.npy", "scan_order_global.npy", "wind_speed.npy", "meta.json")
STATIC_ARRAYS = ("patch_elevation", "patch_elevation_std", "loss_mask", "lat", "lon")
_REQUIRED_KEYS = ("schema_version", "complete", "variables", "targets", "leads_h", "grid", "patch_size",
                  "regions", "n_tokens", "stats", "static", "splits", "source")
_MEMBER_RE = re.compile(r"^(?P<key>(?P<split>[a-z]+)_(?P<index>\d{8}))\.(?P<member>.+)$")


class ShardSetError(ValueError):
    """A shard set that cannot be used as it is; the message names the file and the fix."""


def manifest_path(path: str | Path) -> Path:
    """Accept a shard directory or its manifest.json and return the manifest's path."""
    path = Path(path)
    return path if path.name == MANIFEST else path / MANIFEST


def shard_name(split: str, number: int) -> str:
    """File name of shard `number` of `split` (DESIGN.md: `{split}-NNNNNN.tar`)."""
    return f"{split}-{number:06d}.tar"


def sample_key(split: str, index: int) -> str:
    """`{split}_{index:08d}`, index = position of the input time in its split (dropped ones count too).

    No dots, because webdataset splits member names at the first dot.
    """
    return f"{split}_{index:08d}"


def key_index(key: str) -> int:
    """The split position encoded in a sample key."""
    return int(key.rsplit("_", 1)[1])


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problem(path: Path, size: int, sha256: str) -> str | None:
    """Why a shard file does not match its manifest entry (missing, truncated, changed), or None."""
    if not path.is_file():
        return f"{path.name}: missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path.name}: {actual} bytes on disk, manifest says {size} (truncated or overwritten)"
    if sha256_file(path) != sha256:
        return f"{path.name}: sha256 differs from the manifest (the file changed after it was written)"
    return None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check manifest.json; a missing, malformed or foreign manifest is a ShardSetError."""
    mpath = manifest_path(path)
    fix = "run `python -m pipeline shard --config CONFIG` to (re)write the shard set"
    if not mpath.is_file():
        raise ShardSetError(f"{mpath} does not exist: {fix}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardSetError(f"{mpath} is not valid JSON ({exc}): {fix}") from None
    if not isinstance(manifest, dict):
        raise ShardSetError(f"{mpath} does not hold a JSON object: {fix}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ShardSetError(f"{mpath} lacks the keys {missing}: {fix}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ShardSetError(
            f"{mpath} has schema version {manifest['schema_version']}, this code reads {SCHEMA_VERSION}: {fix}"
        )
    return manifest


def _tar_problems(path: Path, split: str, expected_count: int) -> list[str]:
    """Member-level checks of one tar: names, allowed members, complete samples, count."""
    problems: list[str] = []
    members: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                match = _MEMBER_RE.match(info.name)
                if match is None or match["split"] != split:
                    problems.append(f"{path.name}: unexpected member name {info.name!r}")
                    continue
                if match["member"] not in SAMPLE_MEMBERS:
                    problems.append(f"{path.name}: member {info.name!r} is not allowed (only {SAMPLE_MEMBERS})")
                    continue
                members.setdefault(match["key"], set()).add(match["member"])
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [f"{path.name}: unreadable tar ({exc})"]
    incomplete = [k for k, m in members.items() if m != set(SAMPLE_MEMBERS)]
    if incomplete:
        problems.append(f"{path.name}: {len(incomplete)} sample(s) lack members, e.g. {incomplete[0]}")
    if len(members) != expected_count:
        problems.append(f"{path.name}: {len(members)} samples, manifest says {expected_count}")
    return problems


def _static_problems(root: Path, manifest: dict[str, Any]) -> list[str]:
    problems = []
    for name in STATIC_ARRAYS:
        entry = manifest["static"].get(name)
        if entry is None:
            problems.append(f"static array {name} is not listed in the manifest")
            continue
        path = root / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            problems.append(f"static array {entry['file']}: missing or its sha256 differs from the manifest")
            continue
        arr = np.load(path, allow_pickle=False)
        if list(arr.shape) != entry["shape"] or str(arr.dtype) != entry["dtype"]:
            problems.append(f"static array {entry['file']}: {arr.shape} {arr.dtype}, manifest says "
                            f"{entry['shape']} {entry['dtype']}")
    return problems


def validate_shard_set(path: str | Path) -> list[str]:
    """Every problem of a shard set against its manifest (empty list = valid).

    Reads every byte: file sizes and sha256, tar member names (only SAMPLE_MEMBERS, keys without
    dots), per-shard sample counts, split totals and the static arrays.
    """
    try:
        manifest = read_manifest(path)
    except ShardSetError as exc:
        return [str(exc)]
    root = manifest_path(path).parent
    problems: list[str] = []
    if not manifest["complete"]:
        problems.append("the shard set is incomplete (writing was interrupted): rerun `python -m pipeline shard`")
    for split, record in manifest["splits"].items():
        for shard in record["shards"]:
            problem = shard_problem(root / shard["name"], shard["bytes"], shard["sha256"])
            problems.extend([problem] if problem else _tar_problems(root / shard["name"], split, shard["count"]))
        total = sum(shard["count"] for shard in record["shards"])
        if record["complete"] and total + len(record["dropped"]) != record["n_times"]:
            problems.append(f"split {split}: {total} samples + {len(record['dropped'])} dropped "
                            f"!= {record['n_times']} input times")
    problems.extend(_static_problems(root, manifest))
    return problems


def summarize_shard_set(path: str | Path) -> str:
    """A human-readable summary of a shard set (from the manifest only; cheap)."""
    manifest = read_manifest(path)
    root = manifest_path(path).parent
    lines = [
        f"shard set {root} (schema {manifest['schema_version']}, {'complete' if manifest['complete'] else 'INCOMPLETE'})",
        f"  source: {manifest['source']['store']} (fingerprint {manifest['source']['fingerprint'][:12]})",
        f"  grid {manifest['grid'][0]}x{manifest['grid'][1]}, patch {manifest['patch_size']}, "
        f"{manifest['n_tokens']} tokens, regions {manifest['regions'][0]}x{manifest['regions'][1]}",
        f"  variables ({len(manifest['variables'])}): {', '.join(manifest['variables'])}",
        f"  targets: {', '.join(manifest['targets'])}; leads (h): {manifest['leads_h']}",
    ]
    for split, record in manifest["splits"].items():
        counts = [s["count"] for s in record["shards"]]
        size = sum(s["bytes"] for s in record["shards"])
        lines.append(
            f"  {split}: {sum(counts)} samples in {len(counts)} shards ({size / 2**20:.1f} MiB), "
            f"{len(record['dropped'])} dropped (NaN input)" + ("" if record["complete"] else ", INCOMPLETE")
        )
    lines.append(f"  static arrays: {', '.join(manifest['static'])}")
    return "\n".join(lines)

