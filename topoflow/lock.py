"""One writer per output: an advisory lock beside the store, shard set or run directory.

`fcntl.flock` on a small lock file `.{name}.lock` next to the output. The kernel releases it when
the holder exits for any reason (SIGKILL included), so a stale lock cannot outlive its run and
nothing has to be cleaned up by hand. The file records who holds it (host, pid, command) so the
refusal can say which run to wait for. On a file system without flock support (some NFS mounts) the
lock is skipped with a warning: the run goes on, but a second concurrent writer is not detected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from topoflow.errors import OutputError
from topoflow.files import writing

log = logging.getLogger(__name__)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


def lock_path(output: Path | str) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def exclusive(output: Path | str, what: str) -> Iterator[None]:
    """Hold the lock of `output` for the duration of the block; OutputError if another run holds it."""
    path = lock_path(output)
    with writing(path, "then rerun"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{what} {output} is being written by {_holder(path)} (lock {path}): wait for that "
                              "run to finish or stop it; the lock is released when its process exits") from None
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.warning("file locks are not supported under %s (%s): a concurrent writer of %s is not detected",
                        path.parent, exc.strerror, output)
        with writing(path, "then rerun"):
            os.ftruncate(fd, 0)
            os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}: {' '.join(sys.argv)}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
