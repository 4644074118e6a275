"""Torch threads per rank from the cores a process owns (train/threads.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from threadpoolctl import threadpool_info, threadpool_limits
from torch.utils.data import DataLoader, IterableDataset

from tests.helpers import REPO
from train.threads import init_loader_worker, thread_plan, use_rank_threads


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


@pytest.mark.usefixtures("eight_cores")
def test_torchrun_ranks_share_the_owned_cores_and_torchruns_omp_default_is_replaced():
    plan = thread_plan(None, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"})
    assert (plan.cores, plan.ranks, plan.rank_threads) == (8, 2, 4)
    assert "8 core(s) owned (affinity mask) / 2 rank(s)" in plan.describe()


@pytest.mark.usefixtures("eight_cores")
def test_slurm_cpus_per_task_caps_the_affinity_mask_and_train_threads_wins():
    plan = thread_plan(None, {"SLURM_CPUS_PER_TASK": "6", "LOCAL_WORLD_SIZE": "3"})
    assert (plan.cores, plan.rank_threads, plan.source) == (6, 2, "SLURM_CPUS_PER_TASK")
    assert thread_plan(None, {"SLURM_CPUS_PER_TASK": "16"}).cores == 8  # never more than the mask allows
    assert thread_plan(3, {"LOCAL_WORLD_SIZE": "4"}).rank_threads == 3


@given(cores=st.integers(1, 256), ranks=st.integers(1, 64))
def test_ranks_never_oversubscribe_and_always_get_a_thread(cores, ranks):
    env = {"SLURM_CPUS_PER_TASK": str(cores), "LOCAL_WORLD_SIZE": str(ranks)}
    owned = min(cores, len(os.sched_getaffinity(0)))
    plan = thread_plan(None, env)
    assert plan.rank_threads >= 1
    assert plan.rank_threads * ranks <= owned or plan.rank_threads == 1
    assert (plan.rank_threads + 1) * ranks > owned  # no core left idle that a rank could use


def test_use_rank_threads_sets_torch_in_a_process_pinned_to_one_core():
    """A real affinity mask (as srun's binding or taskset would set it): torch gets one thread."""
    code = ("import os, numpy, torch, threadpoolctl; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]});"
            "torch.set_num_threads(4); threadpoolctl.threadpool_limits(4);"
            "from train.threads import use_rank_threads; p = use_rank_threads(None);"
            "print(p.cores, torch.get_num_threads(), *{i['num_threads'] for i in threadpoolctl.threadpool_info()})")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["1", "1", "1"]  # torch and every BLAS pool numpy loaded


def test_use_rank_threads_logs_the_plan(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="train"), threadpool_limits(limits=None):  # restores the pools on exit
            plan = use_rank_threads(1)
            assert torch.get_num_threads() == 1 and plan.source == "train.threads"
            assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {1}
        assert "1 torch thread(s) per rank (train.threads)" in caplog.text
    finally:
        torch.set_num_threads(before)


class _ThreadsSeen(IterableDataset):
    def __iter__(self):
        yield (torch.get_num_threads(), sorted({i["num_threads"] for i in threadpool_info()}),
               signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)


def test_loader_workers_get_one_thread_in_every_pool_and_ignore_stop_signals():
    import pyresample  # noqa: F401 - a second OpenMP runtime (pykdtree's), as in a rank that built features
    with threadpool_limits(2):  # the rank's pools, which a forked worker inherits
        loader = DataLoader(_ThreadsSeen(), batch_size=None, num_workers=1, worker_init_fn=init_loader_worker,
                            multiprocessing_context="fork")
        (torch_threads, blas_threads, ignores_sigterm), = list(loader)
    assert torch_threads == 1 and blas_threads == [1] and ignores_sigterm
