"""Process-group setup from torchrun's environment and the few collectives the trainer needs.

torchrun (and `srun` through scripts/slurm/train.sbatch) exports RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; a plain `python -m train fit` has none of them and runs as a single
process without a process group, so every helper here is a no-op there.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size, its local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this rank when its launcher dies.

    torchrun stops its ranks when it is signalled politely, but a SIGKILL'd (or OOM-killed) launcher
    leaves them running: they would train on and overwrite last.ckpt under a new run. The standard
    library has no prctl, hence ctypes (Linux only; elsewhere nothing changes).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # orphaned already: the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and pick the device."""
    die_with_launcher()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=dt.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group (so torchrun sees a clean exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor for chaining."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; rank 0's own value is returned unchanged)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; [value] without a process group."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
