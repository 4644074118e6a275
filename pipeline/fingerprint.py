"""Content fingerprints of raw sources: they survive a copy, and stay cheap on TB-scale data.

Guarantee: two sources with the same fingerprint have the same file names, the same file sizes, and
the same bytes in the sampled blocks: the first, middle and last MiB of up to `SAMPLED_FILES` evenly
spread files of the source (all of them when there are fewer), and for a directory (a Zarr store)
every metadata file plus up to `SAMPLED_FILES` evenly spread chunk files, whole. An edit that keeps a file's size and touches only unsampled bytes is NOT detected:
rebuild with `--overwrite` after such edits. Modification times are not part of it, so a plain
`cp -r` of a source keeps its fingerprint.

Each file's fingerprint is cached under `$TOPOFLOW_CACHE_DIR` (default `~/.cache/topoflow`), keyed by
its absolute path, size, mtime and inode, so a rerun reads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from topoflow.files import atomic_write_json

BLOCK = 1 << 20
SAMPLED_FILES = 64
METADATA_NAMES = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")


def cache_path() -> Path:
    root = os.environ.get("TOPOFLOW_CACHE_DIR") or Path.home() / ".cache" / "topoflow"
    return Path(root) / "fingerprints.json"


def _read_cache() -> dict[str, str]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _sampled_hash(path: Path, size: int, whole: bool) -> str:
    """sha256 of size + the first, middle and last BLOCK bytes (or of the whole file)."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if whole or size <= 3 * BLOCK:
            digest.update(fh.read())
        else:
            for offset in (0, size // 2 - BLOCK // 2, size - BLOCK):
                fh.seek(offset)
                digest.update(fh.read(BLOCK))
    return digest.hexdigest()


def _files(path: Path) -> list[tuple[str, Path, bool]]:
    """(relative name, file, content hashed?) of a directory's files: metadata and up to SAMPLED_FILES
    chunk files are hashed, the other chunk files count by name and size."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    meta = [p for p in files if p.name in METADATA_NAMES]
    data = [p for p in files if p.name not in METADATA_NAMES]
    step = max(1, len(data) // SAMPLED_FILES)
    chosen = set(meta) | set(data[::step])
    return [(str(p.relative_to(path)), p, p in chosen) for p in files]


def _entries(paths: list[Path]) -> list[tuple[str, Path, bool, bool]]:
    """(name, file, content hashed?, whole?) of every file behind `paths` (files or Zarr directories)."""
    out = []
    chosen = set(range(0, len(paths), max(1, len(paths) // SAMPLED_FILES)))
    for i, path in enumerate(paths):
        if path.is_dir():
            out += [(f"{path.name}/{name}", file, hashed, True) for name, file, hashed in _files(path)]
        else:
            out.append((path.name, path, i in chosen, False))
    return out


def fingerprint(paths: list[Path]) -> str:
    """Content fingerprint of a source's files (see the module doc for its guarantee)."""
    cache = _read_cache()
    digest = hashlib.sha256()
    fresh = False
    for name, file, hashed, whole in _entries([Path(p) for p in paths]):
        st = file.stat()
        if not hashed:
            digest.update(f"{name}:{st.st_size}".encode())
            continue
        key = f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        if key not in cache:
            cache[key], fresh = _sampled_hash(file, st.st_size, whole=whole), True
        digest.update(f"{name}:{cache[key]}".encode())
    if fresh:
        try:
            cache_path().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path(), cache)
        except OSError:  # a read-only home only costs the next run a re-read
            pass
    return digest.hexdigest()[:16]
