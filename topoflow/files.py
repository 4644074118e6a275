"""Atomic writes and content hashes, shared by every stage that writes or verifies files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from topoflow.errors import OutputError

_CAUSES = {
    errno.ENOSPC: "the disk is full: free space",
    errno.EDQUOT: "the disk quota is exceeded: free space or raise the quota",
    errno.EROFS: "the file system is read-only: choose a writable directory",
    errno.EACCES: "permission denied: fix the permissions or choose another directory",
    errno.EPERM: "permission denied: fix the permissions or choose another directory",
}


@contextlib.contextmanager
def writing(path: Path | str, then: str = "then rerun the command") -> Iterator[None]:
    """Turn an OSError raised while writing under `path` into an OutputError naming the path, the cause
    and the fix (a full disk must not read like a broken input)."""
    try:
        yield
    except OSError as exc:
        cause = _CAUSES.get(exc.errno, f"{exc.strerror or exc}: check the path")
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise OutputError(f"cannot write {path}{where}: {cause}, {then}") from exc


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `payload` to a temporary name beside `path`, fsync, then rename over `path`.

    A reader sees the old file or the new one, never a truncated one; the temporary file is removed
    if writing fails (a full disk leaves nothing behind, and the OutputError names the cause).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
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
