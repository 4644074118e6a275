"""Where the build's tasks run: a LocalCluster, an existing scheduler, or SLURM via dask-jobqueue.

Worker processes, not threads: HDF5 (NetCDF-4) serialises reads across the threads of one process,
so a build only speeds up with more cores when each core is its own process. The defaults are one
single-threaded worker process per core, and one process per core of each SLURM job.

LocalCluster workers keep glibc's default malloc: distributed starts workers with
MALLOC_TRIM_THRESHOLD_=65536, which also switches off glibc's dynamic mmap threshold, so every block-sized
array is mmap'd and page-faulted in afresh; a build task took 1.6x as long with it (300 vs 190 ms per
128x256x24-step block, measured in one process with and without the variable).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import dask
import numcodecs.blosc
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import BuildConfig, SlurmConfig


class BloscThreadsOff(WorkerPlugin):
    """Blosc's own thread pool fights Dask's worker processes for cores; Dask already parallelises blocks."""

    name = "blosc-threads-off"

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed passes its Worker
        numcodecs.blosc.use_threads = False


def slurm_cluster(slurm: SlurmConfig):  # noqa: ANN201 - dask_jobqueue is imported lazily
    """A SLURMCluster with `processes` single-threaded Dask workers per job."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(queue=slurm.queue, account=slurm.account, cores=slurm.cores, processes=slurm.processes,
                        memory=slurm.memory, walltime=slurm.walltime)


@contextlib.contextmanager
def dask_client(build: BuildConfig, scheduler: str | None = None) -> Iterator[Client]:
    """Client on `scheduler` (an address) if given, else on the cluster `build.cluster` names; closed on exit."""
    with contextlib.ExitStack() as stack:
        if scheduler:
            client = stack.enter_context(Client(scheduler))
        elif build.cluster == "slurm":
            cluster = stack.enter_context(slurm_cluster(build.slurm))
            cluster.scale(jobs=build.slurm.jobs)
            client = stack.enter_context(Client(cluster))
        else:
            stack.enter_context(dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}))
            cluster = stack.enter_context(LocalCluster(
                n_workers=build.n_workers, threads_per_worker=build.threads_per_worker, processes=build.processes,
                memory_limit=build.memory_limit, dashboard_address=None, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        client.register_plugin(BloscThreadsOff())
        yield client
