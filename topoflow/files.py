"""Atomic writes and content hashes, shared by every stage that writes or verifies files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `payload` to a temporary name beside `path`, fsync, then rename over `path`.

    A reader sees the old file or the new one, never a truncated one; the temporary file is removed
    if writing fails (a full disk leaves nothing behind).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def canonical_json(obj: Any) -> bytes:
    """Sorted-key JSON bytes: the same data always gives the same bytes (and hash)."""
    return json.dumps(obj, sort_keys=True, default=str).encode()


def atomic_write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    """Pretty JSON written atomically; sorted keys (manifests) or the caller's order (reports)."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=sort_keys, default=str).encode() + b"\n")


def sha256_json(obj: Any) -> str:
    """Hex sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()
