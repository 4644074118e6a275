"""Where the build's tasks run: a LocalCluster, an existing scheduler, or SLURM via dask-jobqueue.

Worker processes, not threads: HDF5 (NetCDF-4) serialises reads across the threads of one process,
so a build only speeds up with more cores when each core is its own process. The defaults are one
single-threaded worker process per core, and one process per core of each SLURM job.

Every worker (local, SLURM or an existing scheduler's) keeps the memory of freed block arrays for the next
block (`keep_freed_memory`): by default glibc hands arrays over 32 MiB (a 24-step block of 11 variables at
128x256 is 35 MiB) and, in Dask's worker processes, many smaller ones straight back to the kernel, and the
next block faults every page in afresh. Measured on a 480-step 128x256 build on 2 workers: 11,000 -> 1,100
page faults per block, kernel time 2.45 -> 1.57 s, build / plain copy 1.46x -> 1.11x (one run, side by side).

The build's own LocalCluster runs without Dask's dashboard-only polling (`QUIET_LOCAL_CLUSTER`). SLURM
clusters keep Dask's settings: their scheduler serves a dashboard (dask-jobqueue's default :8787, where
bokeh is installed). So do existing schedulers, which are the user's.

On SLURM a build never waits forever for workers that will not come: a failed sbatch is reported at
once with SLURM's answer and the job script, and no worker within `build.slurm.wait_timeout_s` is an
error too. A job whose workers all left (worker_lifetime reached, walltime) is resubmitted, so the
build keeps `build.slurm.jobs` jobs until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numcodecs.blosc
import zarr
from dask.utils import parse_timedelta
from dask_jobqueue import SLURMCluster
from dask_jobqueue.slurm import SLURMJob
from distributed import Client, LocalCluster
from distributed.core import Status
from distributed.deploy.cluster import Cluster
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import BuildConfig, SlurmConfig
from topoflow.errors import ConfigError

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often the wait for the first SLURM worker looks for failed submissions


# The build's own LocalCluster has no dashboard, so nobody reads the worker's statistical profile (a stack
# sample every 10 ms) or needs a blocked event loop found within 20 ms; and its block tasks' memory is bounded
# by the block, so a 1 s memory check suffices. Measured here: Dask's own polling on an idle cluster of 2
# worker processes took 9-13% of a core by default, 1.5% with these; 480-step builds on 2 processes took
# 1.16 -> 1.10 s (medians of 9, side by side), time that 2 workers on 2 cores share with this polling.
QUIET_LOCAL_CLUSTER = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s",
                       "distributed.worker.memory.monitor-interval": "1s",
                       "distributed.admin.system-monitor.interval": "2s"}

KEPT_FREED_BYTES = 256 << 20  # glibc keeps up to this much freed memory per arena, and mmaps only larger arrays
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(limit: int = KEPT_FREED_BYTES) -> bool:
    """Make glibc's malloc keep freed memory up to `limit` bytes and serve arrays up to that size from it,
    instead of returning them to the kernel and page-faulting them in again for the next block; False
    where the C library has no mallopt (not glibc), which changes nothing else.

    Set at run time (mallopt), so it holds on every kind of worker, and over distributed's default
    MALLOC_TRIM_THRESHOLD_=65536 in its worker processes' environment.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))


class BuildWorkerSetup(WorkerPlugin):
    """Per build worker: Blosc's own thread pool off; in a worker process of its own, Zarr's pool (compression,
    file writes) as large as the worker's Dask threads, so N single-threaded worker processes use N cores
    rather than N x (cores + 4) threads (Zarr's default; it applies where the process has not used Zarr yet);
    and freed block memory kept for the next block (`keep_freed_memory`)."""

    name = "topoflow-build-worker"
    idempotent = True  # registered once per scheduler: a later build on it skips the round trip to every worker

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed passes its Worker
        numcodecs.blosc.use_threads = False
        keep_freed_memory()
        if multiprocessing.parent_process() is not None:  # a process of its own (a Nanny's), not the client's
            zarr.config.set({"threading.max_workers": worker.state.nthreads})


class WatchedSLURMJob(SLURMJob):
    """A SLURM job that keeps a failed submission (sbatch missing, its exit code and stderr) for
    `dask_client` to report once; dask-jobqueue raises it in the cluster's background task, where it
    only floods the console with tracebacks while the build waits forever."""

    submit_error: str | None = None

    async def start(self) -> None:
        try:
            await super().start()
        except (OSError, RuntimeError, ValueError) as exc:  # no sbatch, sbatch failed, no job id in its output
            self.submit_error = str(exc).strip()
            self.status = Status.running  # SpecCluster asserts it; with no job id, close() cancels nothing

    async def close(self) -> None:
        """scancel the job; the status says so (SpecCluster's close asserts it of every job still referenced)."""
        await super().close()
        self.status = Status.closed


class BuildSLURMCluster(SLURMCluster):
    """SLURMCluster that resubmits a job once all its workers left the scheduler.

    SpecCluster drops a job whose worker left only when the job runs one worker process (job and
    worker share the name); with `processes` > 1 a job that ended (worker lifetime, walltime) was never
    replaced, even under adapt() (dask/distributed#9102, dask/dask-jobqueue#691), and the build stalled.
    """

    job_cls = WatchedSLURMJob

    def _update_worker_status(self, op: str, msg) -> None:  # noqa: ANN001 - a worker address or a dict
        if op != "remove":
            super()._update_worker_status(op, msg)
            return
        name = self._job_of(self.scheduler_info["workers"][msg]["name"])
        if name in self.workers:
            delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay, self._replace_if_gone, name, self.workers[name])
        Cluster._update_worker_status(self, op, msg)  # not SpecCluster's: it would close the replacement

    def _job_of(self, worker: str) -> str:
        """The job (worker_spec name) a worker belongs to: `<job>` or, with processes > 1, `<job>-<i>`."""
        for name, spec in self.worker_spec.items():
            if worker == name or worker in {f"{name}{suffix}" for suffix in spec.get("group", ())}:
                return name
        return worker

    def _replace_if_gone(self, name: str, job: WatchedSLURMJob) -> None:
        """Cancel `job` and submit a new one under its name once none of its workers is left, unless the
        cluster is closing, no longer wants the job, or replaced it already (one callback per worker)."""
        if self.status != Status.running or name not in self.worker_spec or self.workers.get(name) is not job:
            return
        if any(self._job_of(w["name"]) == name for w in self.scheduler_info["workers"].values()):
            return
        del self.workers[name]
        self._futures.add(asyncio.ensure_future(self._resubmit(name, job)))

    async def _resubmit(self, name: str, ended: WatchedSLURMJob) -> None:
        """scancel the ended job, submit its replacement, and say so once if SLURM refused it."""
        await ended.close()
        await self._correct_state()
        job = self.workers.get(name)
        if job is not None and job.submit_error:
            log.warning("resubmitting SLURM job %s failed, the build goes on with fewer workers (with none left it "
                        "waits: stop it, fix build.slurm and rerun, finished blocks are kept): %s",
                        name, job.submit_error)


def slurm_cluster(slurm: SlurmConfig) -> BuildSLURMCluster:
    """A SLURM cluster of `processes` single-threaded Dask workers per job, no job submitted yet.

    Empty prologue / extra arguments are passed as None so a site's dask-jobqueue config still applies.
    """
    return BuildSLURMCluster(
        queue=slurm.queue, account=slurm.account, cores=slurm.cores, processes=slurm.processes, memory=slurm.memory,
        walltime=slurm.walltime, interface=slurm.interface, local_directory=slurm.local_directory,
        job_script_prologue=slurm.job_script_prologue or None, worker_extra_args=slurm.worker_extra_args or None)


def _indented(text: str) -> str:
    return textwrap.indent(text.strip(), "    ")


def submission_failed(cluster: BuildSLURMCluster, errors: list[str], n_jobs: int) -> ConfigError:
    return ConfigError(
        f"SLURM refused the build's Dask worker jobs (sbatch failed for {len(errors)} of {n_jobs}):\n"
        f"{_indented(errors[0])}\nfix build.slurm (queue = partition, account, walltime, memory, cores) to what this "
        "cluster accepts (`sinfo -s` lists partitions and time limits, `sacctmgr show assoc user=$USER` your "
        "accounts), or save this job script as job.sh and run `sbatch job.sh` to see SLURM's answer:\n"
        + _indented(cluster.job_script()))


def no_worker_joined(cluster: BuildSLURMCluster, slurm: SlurmConfig, job_ids: list[str]) -> ConfigError:
    ids = ",".join(job_ids)
    return ConfigError(
        f"no Dask worker joined within build.slurm.wait_timeout_s={slurm.wait_timeout_s:g} s, although SLURM accepted "
        f"jobs {ids} (now cancelled). If `sacct -j {ids}` shows them PENDING, the queue is busy: raise "
        "build.slurm.wait_timeout_s or ask for smaller jobs (cores, memory, walltime). If they ran, read their logs "
        f"(slurm-<jobid>.out in {os.getcwd()}): workers that cannot reach the scheduler at {cluster.scheduler_address} "
        "need build.slurm.interface (e.g. ib0); workers that cannot start Python need build.slurm.job_script_prologue "
        "(module load, source .venv/bin/activate). The job script:\n" + _indented(cluster.job_script()))


def wait_for_first_worker(client: Client, cluster: BuildSLURMCluster, slurm: SlurmConfig) -> None:
    """Return once a worker joined (the others join as SLURM starts their jobs); a failed sbatch, or no
    worker within slurm.wait_timeout_s, is a ConfigError naming the cause."""
    deadline = time.monotonic() + slurm.wait_timeout_s
    while True:
        jobs = list(cluster.workers.values())  # filled once every sbatch of scale() has returned
        errors = [job.submit_error for job in jobs if job.submit_error]
        if errors:
            raise submission_failed(cluster, errors, len(jobs))
        left = deadline - time.monotonic()
        if left <= 0:
            raise no_worker_joined(cluster, slurm, [str(job.job_id) for job in jobs])
        with contextlib.suppress(TimeoutError):
            client.wait_for_workers(1, timeout=min(POLL_S, left))
            return


@contextlib.contextmanager
def slurm_client(slurm: SlurmConfig) -> Iterator[Client]:
    """Submit slurm.jobs jobs and yield a client once the first worker joined; every job is cancelled on exit."""
    with slurm_cluster(slurm) as cluster, Client(cluster) as client:
        cluster.scale(jobs=slurm.jobs)
        wait_for_first_worker(client, cluster, slurm)
        yield client


def scheduler_address(scheduler_file: Path) -> str:
    """The address that `dask scheduler --scheduler-file PATH` wrote into PATH."""
    try:
        address = json.loads(Path(scheduler_file).read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"--scheduler-file {scheduler_file}: no scheduler address can be read from it ({exc!r}); start the "
            f"scheduler first (`dask scheduler --scheduler-file {scheduler_file}`), wait until it wrote the file, "
            "and pass that path") from None
    return str(address)


def scheduler_target(scheduler: str | None, scheduler_file: Path | None) -> str:
    """The existing scheduler's address, for messages; a usage mistake is a ConfigError before any work starts."""
    if scheduler and scheduler_file:
        raise ConfigError("pass either --scheduler ADDRESS or --scheduler-file PATH, not both")
    if scheduler_file:
        return f"{scheduler_address(scheduler_file)} (from {scheduler_file})"
    if scheduler.endswith(".json") or Path(scheduler).is_file():
        raise ConfigError(f"--scheduler {scheduler!r} is a file, not an address such as tcp://host:8786: "
                          f"use --scheduler-file {scheduler}")
    return scheduler


def existing_scheduler(scheduler: str | None, scheduler_file: Path | None) -> Client:
    """A client of a running scheduler, given by its address or by the scheduler file it wrote."""
    where = scheduler_target(scheduler, scheduler_file)
    try:
        return Client(scheduler_file=str(scheduler_file)) if scheduler_file else Client(scheduler)
    except (OSError, ValueError) as exc:  # OSError includes the connect timeout
        raise ConfigError(f"cannot reach a Dask scheduler at {where} ({exc}); start it, or check that its job still "
                          "runs, and pass its current address or scheduler file") from None


@contextlib.contextmanager
def dask_client(build: BuildConfig, scheduler: str | None = None, scheduler_file: Path | None = None
                ) -> Iterator[Client]:
    """Client on `scheduler` (an address) or on the scheduler of `scheduler_file` if given, else on the cluster
    `build.cluster` names; closed on exit (with every SLURM job it submitted)."""
    with contextlib.ExitStack() as stack:
        if scheduler or scheduler_file:
            client = stack.enter_context(existing_scheduler(scheduler, scheduler_file))
        elif build.cluster == "slurm":
            client = stack.enter_context(slurm_client(build.slurm))
        else:
            stack.enter_context(dask.config.set(QUIET_LOCAL_CLUSTER))
            cluster = stack.enter_context(LocalCluster(
                n_workers=build.n_workers, threads_per_worker=build.threads_per_worker, processes=build.processes,
                memory_limit=build.memory_limit, dashboard_address=None, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        client.register_plugin(BuildWorkerSetup())
        yield client
