"""Torch threads sized to the cores each process owns, so ranks and loader workers do not oversubscribe.

torch starts one intra-op thread per core of the whole machine in every process, and torchrun sets
OMP_NUM_THREADS=1 whenever it starts more than one rank. The first oversubscribes a shared node
(2 ranks x 2 threads on 2 cores: each step several times slower, see benchmarks/train.py); the
second leaves most cores of a 64-core HPC node idle. The cores a process owns are its CPU affinity
mask (srun's binding, taskset, a cgroup cpuset), capped by SLURM_CPUS_PER_TASK when SLURM gives one;
torchrun's LOCAL_WORLD_SIZE ranks on the node share them evenly. The BLAS pools numpy and scipy load
(OpenBLAS starts one thread per core of the machine, like torch) get the same limit through threadpoolctl.
Loader workers get one thread in every pool (torch, BLAS, OpenMP): they only read, check and decode
shards, so a worker's core is mostly idle and the rank keeps its full share.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from threadpoolctl import threadpool_limits

from train.preempt import ignore_stop_signals

log = logging.getLogger("train")


@dataclass(frozen=True)
class ThreadPlan:
    """How one rank uses the cores it owns."""

    cores: int  # CPUs this process may run on
    ranks: int  # ranks on this node sharing them (torchrun's LOCAL_WORLD_SIZE)
    rank_threads: int  # torch intra-op threads of each rank
    source: str  # "train.threads" or where `cores` came from

    def describe(self) -> str:
        if self.source == "train.threads":
            return f"{self.rank_threads} torch thread(s) per rank (train.threads)"
        return (f"{self.cores} core(s) owned ({self.source}) / {self.ranks} rank(s) on this node -> "
                f"{self.rank_threads} torch thread(s) per rank")


def cores_owned(environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """(cores this process may use, where that figure came from)."""
    cores, source = len(os.sched_getaffinity(0)), "affinity mask"
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < cores:
        cores, source = int(slurm), "SLURM_CPUS_PER_TASK"
    return cores, source


def thread_plan(requested: int | None, environ: Mapping[str, str] = os.environ) -> ThreadPlan:
    """`requested` threads per rank if given, else an even share of the owned cores (at least 1)."""
    ranks = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    cores, source = cores_owned(environ)
    if requested is not None:
        return ThreadPlan(cores, ranks, requested, "train.threads")
    return ThreadPlan(cores, ranks, max(1, cores // ranks), source)


def use_rank_threads(requested: int | None) -> ThreadPlan:
    """Size this rank's torch threads (call once per process, before the first heavy op) and log it."""
    plan = thread_plan(requested)
    torch.set_num_threads(plan.rank_threads)
    threadpool_limits(plan.rank_threads, user_api="blas")  # OpenMP is torch's, set just above
    log.info("threads: %s", plan.describe())
    return plan


def init_loader_worker(worker_id: int) -> None:
    """DataLoader's worker_init_fn: one thread in every BLAS and OpenMP pool loaded (torch's worker loop
    already sets one torch thread; pyresample's pykdtree brings its own OpenMP runtime), and the stop
    signals left to the rank (`train.preempt.ignore_stop_signals`)."""
    threadpool_limits(1)
    ignore_stop_signals(worker_id)
