"""`pipeline.cluster`: SLURM without SLURM (fake sbatch/scancel on PATH) and existing schedulers."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numcodecs.blosc
import pytest
from distributed import Client, LocalCluster

from pipeline import build
from pipeline.cluster import dask_client, slurm_cluster
from pipeline.config import BuildConfig, SlurmConfig, slurm_seconds
from topoflow.config import validate_section
from topoflow.errors import ConfigError

SBATCH_ERROR = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
REPO = Path(__file__).resolve().parents[2]
FAULTS = """
import resource, sys, threading
import numpy as np
from pipeline.cluster import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def blocks():  # like build tasks in a worker thread: a 35 MiB block and a 3 MiB variable, ten times over
    start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):
        block, variable = np.ones((35 << 20) // 8), np.ones((3 << 20) // 8)
        del block, variable
    print(kept, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)
worker = threading.Thread(target=blocks)
worker.start()
worker.join()
"""
RECORD_SCANCEL = 'echo "$1" >> "$(dirname "$0")/cancelled"\n'
KILL_JOB = 'kill -- -"$1" 2>/dev/null || true\n'  # the fake job id is the job's process group


def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sbatch: str, scancel: str = RECORD_SCANCEL) -> Path:
    """bin/sbatch, bin/scancel and bin/squeue running the given bash bodies, first on PATH; returns bin/."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": sbatch, "scancel": scancel, "squeue": "exit 0\n"}.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def slurm_build(**slurm: object) -> BuildConfig:
    small = {"account": "proj42", "cores": 1, "processes": 1, "memory": "1GB", "walltime": "00:10:00", "jobs": 2}
    return BuildConfig(cluster="slurm", slurm={**small, **slurm})


def cancelled(bin_dir: Path) -> list[str]:
    path = bin_dir / "cancelled"
    return sorted(path.read_text().split()) if path.exists() else []


@pytest.mark.timeout(60)
def test_failed_sbatch_is_reported_at_once_with_slurms_answer(tmp_path, monkeypatch, capfd, caplog):
    bin_dir = fake_slurm(tmp_path, monkeypatch, f'echo "{SBATCH_ERROR}" >&2\nexit 1\n')
    start = time.monotonic()
    with pytest.raises(ConfigError) as err, dask_client(slurm_build(wait_timeout_s=20)):
        pass
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < 10, f"waited {elapsed:.1f} s for workers that cannot come"  # not the 20 s timeout
    assert SBATCH_ERROR in message and "sbatch failed for 2 of 2" in message
    assert "#SBATCH -A proj42" in message and "sbatch job.sh" in message  # the job script to try by hand
    assert cancelled(bin_dir) == []  # no job was accepted, none to cancel
    gc.collect()  # an unretrieved task exception would be logged now
    out, errors = capfd.readouterr()
    assert "Traceback" not in out + errors and "Task exception" not in out + errors
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []  # pytest's handler takes them


@pytest.mark.timeout(60)
def test_missing_sbatch_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands at all
    with pytest.raises(ConfigError, match=r"sbatch failed for 2 of 2(.|\n)*No such file or directory: 'sbatch'"):
        with dask_client(slurm_build(wait_timeout_s=20)):
            pass


@pytest.mark.timeout(60)
def test_jobs_that_never_start_time_out_and_are_cancelled(tmp_path, monkeypatch, capfd):
    bin_dir = fake_slurm(tmp_path, monkeypatch, 'echo "Submitted batch job $$"\n')  # accepted, stays pending
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"no Dask worker joined within build.slurm.wait_timeout_s=3 s") as err:
        with dask_client(slurm_build(wait_timeout_s=3)):
            pass
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 13
    ids = re.search(r"accepted jobs (\d+),(\d+)", str(err.value)).groups()
    assert cancelled(bin_dir) == sorted(ids)  # scancel for both, on exit
    assert "build.slurm.interface" in str(err.value) and "sacct -j" in str(err.value)
    out, errors = capfd.readouterr()
    assert "Traceback" not in out + errors


def test_job_script_carries_site_settings():
    cfg = SlurmConfig(cores=4, processes=2, walltime="01:00:00", interface="lo", local_directory="$TMPDIR",
                      job_script_prologue=["module load netcdf", "source /opt/venv/bin/activate"],
                      worker_lifetime="55m", lifetime_stagger="4m")
    with slurm_cluster(cfg) as cluster:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")  # the interface is the scheduler's too
    lines = script.splitlines()
    worker = next(i for i, line in enumerate(lines) if "distributed.cli.dask_worker" in line)
    assert lines.index("module load netcdf") < lines.index("source /opt/venv/bin/activate") < worker
    for arg in ("--nworkers 2", "--nthreads 2", "--local-directory $TMPDIR", "--lifetime 55m --lifetime-stagger 4m",
                "--interface lo"):
        assert arg in lines[worker]
    assert "--lifetime-restart" not in script  # a restart inside the job would still be killed at the walltime
    assert "#SBATCH -t 01:00:00" in lines


def test_job_script_without_site_settings():
    with slurm_cluster(SlurmConfig(cores=2, processes=2)) as cluster:
        script = cluster.job_script()
    assert "--lifetime" not in script and "--interface" not in script and "--local-directory" not in script


@pytest.mark.parametrize("walltime, seconds", [("90", 5400), ("90:30", 5430), ("02:00:00", 7200), ("1-2", 93600),
                                               ("1-02:30", 95400), ("1-02:30:15", 95415)])
def test_slurm_time_limits(walltime, seconds):
    assert slurm_seconds(walltime) == seconds


@pytest.mark.parametrize("slurm, problem", [
    ({"walltime": "01:00:00", "worker_lifetime": "60m"}, "does not end before the walltime 01:00:00"),
    ({"walltime": "01:00:00", "worker_lifetime": "2h"}, "does not end before the walltime 01:00:00"),
    ({"walltime": "01:00:00", "worker_lifetime": "57m"}, "does not end before the walltime"),  # 57 + 4 > 60
    ({"worker_lifetime": "3m"}, "lifetime_stagger 4m must be shorter than slurm.worker_lifetime 3m"),
    ({"worker_lifetime": "soon"}, "'soon' is not a duration"),
    ({"walltime": "2h"}, "'2h' is not a SLURM time limit"),
])
def test_bad_slurm_settings_are_config_errors(slurm, problem):
    with pytest.raises(ConfigError, match="slurm") as err:
        validate_section(BuildConfig, {"slurm": slurm}, "exp.yaml")
    assert problem in str(err.value)


def test_worker_lifetime_that_fits_gives_worker_args():
    cfg = validate_section(BuildConfig, {"slurm": {"walltime": "1:00:00", "worker_lifetime": "55m"}}, "exp.yaml").slurm
    assert cfg.worker_extra_args == ["--lifetime", "55m", "--lifetime-stagger", "4m"]
    assert cfg.wait_timeout_s == 600


@pytest.fixture
def scheduler(tmp_path, monkeypatch) -> Iterator[tuple[LocalCluster, Path]]:
    """A running in-process scheduler with one worker and the scheduler file it is known by."""
    monkeypatch.setattr(numcodecs.blosc, "use_threads", numcodecs.blosc.use_threads)  # the plugin flips it here
    path = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as owner:
        owner.write_scheduler_file(str(path))
        yield cluster, path


@pytest.mark.timeout(60)
def test_scheduler_file_connects_and_runs(scheduler):
    cluster, path = scheduler
    with dask_client(BuildConfig(cluster="slurm"), scheduler_file=path) as client:  # the file wins over build.cluster
        assert client.scheduler.address == cluster.scheduler_address
        assert client.submit(lambda x: x + 1, 41).result() == 42


@pytest.mark.parametrize("content", [None, "{}", "not json"])
def test_unusable_scheduler_file(tmp_path, content):
    path = tmp_path / "scheduler.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(f"--scheduler-file {path}: no scheduler address")) as err:
        with dask_client(BuildConfig(), scheduler_file=path):
            pass
    assert f"dask scheduler --scheduler-file {path}" in str(err.value)


@pytest.mark.timeout(60)
def test_stale_scheduler_file(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tmp_path / "scheduler.json"
    path.write_text(f'{{"address": "tcp://127.0.0.1:{port}"}}')
    start = time.monotonic()
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(
            ConfigError, match=re.escape(f"cannot reach a Dask scheduler at tcp://127.0.0.1:{port} (from {path})")):
        with dask_client(BuildConfig(), scheduler_file=path):
            pass
    assert time.monotonic() - start < 15


def test_json_path_given_as_address():
    with pytest.raises(ConfigError, match="use --scheduler-file sched.json"):
        with dask_client(BuildConfig(), scheduler="sched.json"):
            pass


def test_cli_scheduler_options(capsys):
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    args = parser.parse_args(["--config", "exp.yaml", "--scheduler-file", "run/scheduler.json"])
    assert args.scheduler_file == Path("run/scheduler.json") and args.scheduler is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", "exp.yaml", "--scheduler", "tcp://h:8786", "--scheduler-file", "s.json"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, problem", [
    ("--scheduler", "sched.json", "use --scheduler-file sched.json"),
    ("--scheduler-file", "no-such-dir/scheduler.json", "--scheduler-file no-such-dir/scheduler.json: no scheduler"),
])
def test_cli_refuses_a_wrong_scheduler_before_scanning_sources(monkeypatch, flag, value, problem):
    monkeypatch.setattr(build, "describe_sources", lambda data: pytest.fail("sources scanned before the check"))
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    with pytest.raises(ConfigError, match=problem):
        build.run(parser.parse_args(["--config", str(REPO / "configs" / "demo.yaml"), flag, value]))


RUN_JOB = """d=$(dirname "$0")
cp "$1" "$d/job-$$.sh"  # dask-jobqueue deletes its script once sbatch returns
setsid bash "$d/job-$$.sh" > "$d/job-$$.out" 2>&1 < /dev/null &
echo $! >> "$d/groups"
echo "Submitted batch job $!"
"""
REFUSE_AFTER_FIRST = """if [[ -e "$(dirname "$0")/groups" ]]; then
  echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1
fi
"""
# two worker processes per job that retire after 4 +- 1 s; a job is replaced 0.5 s after its last worker left
RETIRING = {"cores": 2, "processes": 2, "memory": "2GB", "jobs": 1, "worker_lifetime": "4s", "lifetime_stagger": "1s",
            "wait_timeout_s": 60}


@pytest.fixture
def local_slurm(tmp_path, monkeypatch):
    """Factory of a fake SLURM whose sbatch runs `prefix` and then the job script on this machine, in its
    own process group (the job id); scancel kills the group. Jobs left running are killed at teardown."""
    def make(prefix: str = "") -> Path:
        return fake_slurm(tmp_path, monkeypatch, prefix + RUN_JOB, scancel=RECORD_SCANCEL + KILL_JOB)

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0.5s"}):
        yield make
    groups = tmp_path / "bin" / "groups"
    for group in groups.read_text().split() if groups.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(group), signal.SIGKILL)


def current_job_id(client: Client) -> str | None:
    """The id of the one job the cluster holds; None while its replacement is being submitted."""
    jobs = list(client.cluster.workers.values())
    return jobs[0].job_id if jobs else None


@pytest.mark.timeout(120)
def test_jobs_that_end_are_resubmitted(local_slurm):
    """Workers retire at worker_lifetime, their job ends and is resubmitted: the build keeps its workers,
    also with several worker processes per job (upstream SpecCluster only replaces single-process jobs)."""
    bin_dir = local_slurm()
    with dask_client(slurm_build(**RETIRING)) as client:
        first = current_job_id(client)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (current_job_id(client) in (first, None)
                                               or len(client.scheduler_info()["workers"]) < 2):
            time.sleep(0.2)
        second = current_job_id(client)
        assert second not in (first, None), "the job whose workers retired was not resubmitted"
        client.wait_for_workers(2, timeout=30)
        assert client.submit(sum, [1, 2]).result() == 3
    assert (bin_dir / "groups").read_text().split() == [first, second]  # one replacement, not one per worker
    assert cancelled(bin_dir) == sorted([first, second])  # the ended job on replacement, the new one on exit


def cluster_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.cluster"]


@pytest.mark.timeout(120)
def test_failed_resubmission_is_logged_once(local_slurm, caplog):
    local_slurm(REFUSE_AFTER_FIRST)
    with dask_client(slurm_build(**RETIRING)), caplog.at_level(logging.WARNING, logger="pipeline.cluster"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not cluster_warnings(caplog):
            time.sleep(0.2)
        time.sleep(1)  # room for a second report, which must not come
    warnings = cluster_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("resubmitting SLURM job BuildSLURMCluster-0 failed, the build goes on with fewer")
    assert "QOSMaxSubmitJobPerUserLimit" in warnings[0]


@pytest.mark.timeout(60)
def test_the_builds_own_local_cluster_polls_less_and_leaves_the_users_dask_config_alone():
    users = dask.config.get("distributed")
    with dask_client(BuildConfig(n_workers=1, threads_per_worker=1, processes=True)) as client:
        # each server's periodic checks and how often they run (ms); lambdas travel by value to the worker
        worker = next(iter(client.run(lambda dask_worker: {
            name: pc.callback_time for name, pc in dask_worker.periodic_callbacks.items()}).values()))
        scheduler = client.run_on_scheduler(lambda dask_scheduler: {
            name: pc.callback_time for name, pc in dask_scheduler.periodic_callbacks.items()})
    assert "profile" not in worker, "no dashboard reads the workers' 10 ms stack samples"
    assert worker["tick"] == scheduler["tick"] == 1000
    assert worker["memory_monitor"] == 1000 and worker["monitor"] == scheduler["monitor"] == 2000
    assert dask.config.get("distributed") == users


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, Linux's per-thread fault counts")
def test_workers_keep_freed_block_memory_instead_of_faulting_it_in_again():
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}  # as distributed starts workers
    runs = {mode: subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True,
                                 check=True).stdout.split() for mode in ("keep", "default")}
    assert runs["keep"][0] == "True"
    kept, default = int(runs["keep"][1]), int(runs["default"][1])
    assert default > 4 * kept, f"page faults: {kept} keeping freed memory, {default} without"
