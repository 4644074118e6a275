"""Kill a command at its N-th file-system write, the way a cluster kills a job: SIGKILL, no cleanup.

`run_killed(["pipeline", "build", ...], kill_at=N)` runs `python -m pipeline build ...` under a small
harness that counts every mutating file-system call made from Python (open for writing, os.replace,
os.rename, os.unlink, os.mkdir, os.rmdir, shutil.rmtree; zarr, tarfile, torch.save and json all go
through them) and SIGKILLs the whole process group just before call number N. With kill_at=0 it runs
to the end and reports how many such calls it made, so a test can draw its kill moments from
[1, count]: every moment is a place where a real kill can land (between two writes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

HARNESS = r"""
import atexit, builtins, io, json, os, runpy, shutil, signal, sys

limit, count = int(os.environ["KILL_AT_WRITE"]), [0]


def tick():
    count[0] += 1
    if count[0] == limit:
        os.killpg(0, signal.SIGKILL)


def counted(fn, is_write=lambda *a, **k: True):
    def call(*args, **kwargs):
        if is_write(*args, **kwargs):
            tick()
        return fn(*args, **kwargs)
    return call


def writes(file, mode="r", *args, **kwargs):
    return isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+")


builtins.open = io.open = counted(io.open, writes)
for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir"):
    setattr(os, name, counted(getattr(os, name)))
shutil.rmtree = counted(shutil.rmtree)
main_pid = os.getpid()


@atexit.register
def report():
    if os.getpid() == main_pid:
        with io.FileIO(os.environ["KILL_REPORT"], "w") as fh:
            fh.write(json.dumps({"writes": count[0]}).encode())


sys.argv = ["python -m " + sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0].split()[-1], run_name="__main__", alter_sys=True)
"""


def run_killed(args: list[str], tmp: Path, kill_at: int, timeout: float = 300) -> tuple[int, int | None]:
    """(return code, writes made) of `python -m ARGS` killed before its `kill_at`-th write (0: not killed).

    The return code is -9 when the kill landed; `writes` is None then.
    """
    harness = tmp / "kill_harness.py"
    harness.write_text(HARNESS)
    report = tmp / f"kill_report-{kill_at}.json"
    report.unlink(missing_ok=True)
    env = {**os.environ, "KILL_AT_WRITE": str(kill_at), "KILL_REPORT": str(report), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(harness), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    if proc.returncode not in (0, -9):
        raise AssertionError(f"{args} failed with {proc.returncode}:\n{proc.stderr[-3000:]}")
    writes = json.loads(report.read_text())["writes"] if report.is_file() else None
    return proc.returncode, writes


def _without_history(tree: object) -> object:
    if isinstance(tree, dict):
        return {k: _without_history(v) for k, v in tree.items() if k != "history"}
    return tree


def assert_same_tree(a: Path, b: Path) -> None:
    """Every file under `a` and `b` has the same relative path and the same bytes; in Zarr metadata
    (zarr.json) only the CF `history` attribute may differ, as it records when each run happened."""
    def files(root: Path) -> dict[str, Path]:
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb), (sorted(set(fa) ^ set(fb)))
    for name, path in fa.items():
        if path.name == "zarr.json":
            assert _without_history(json.loads(path.read_text())) == _without_history(json.loads(fb[name].read_text()))
        else:
            assert path.read_bytes() == fb[name].read_bytes(), name


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (read from /proc: Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid`: ranks of a launcher and their loader workers."""
    found, todo = [], [pid]
    while todo:
        below = children(todo.pop())
        found += below
        todo += below
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all(pids: list[int]) -> None:
    """SIGKILL whatever of `pids` still exists: a failed test leaves no trainer running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
