"""`ShardStream`: one rank's iterable of `Batch`, in-process or through DataLoader workers, resumable.

Resume: `state_dict()` records (epoch, batches consumed); `load_state_dict()` makes the next iteration
replay each worker's deterministic stream and skip, undecoded, what it had delivered. The DataLoader
asks its workers round-robin starting at worker 0, so worker ids are rotated by the phase of the
position (`plan.next_worker`): the worker asked first is the one the interrupted run would have asked
next, and the merged order continues batch for batch at any worker count.

Workers: each batch crosses to the main process as pickled numpy arrays (~3 MB at batch 16 on the
demo grid). On a busy 2-core machine that IPC made 1-2 workers slower than num_workers=0; workers
pay off where there are spare cores per rank (HPC nodes).
"""

from __future__ import annotations

import itertools
import multiprocessing
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shardset import manifest_path
from topoflow.errors import ShardSetError
from train.batch import Batch
from train.loader import stages
from train.loader.plan import EpochPlan, Mode, next_worker, plan_epoch, round_robin, skip_per_worker
from train.shards import ShardSet, load_shard_set
from train.threads import init_loader_worker


class _Reader:
    """Everything one reader (rank, worker) needs to produce its batches; picklable for workers."""

    def __init__(self, root: Path, split: str, batch_size: int, mode: Mode, seed: int, rank: int,
                 world_size: int, readers: int, shuffle_buffer: int, strict: bool) -> None:
        self.root, self.split, self.batch_size, self.mode = root, split, batch_size, mode
        self.seed, self.rank, self.world_size, self.readers = seed, rank, world_size, readers
        self.shuffle_buffer, self.strict = shuffle_buffer, strict

    def plan(self, epoch: int) -> EpochPlan:
        entries = load_shard_set(self.root).shards(self.split)
        return plan_epoch(entries, mode=self.mode, batch_size=self.batch_size, seed=self.seed, epoch=epoch,
                          rank=self.rank, world_size=self.world_size, readers=self.readers)

    def batches(self, epoch: int, worker: int, position: int) -> Iterator[dict[str, Any]]:
        """This worker's batches of `epoch`, skipping those delivered before `position` (rank-wide)."""
        shards = load_shard_set(self.root)
        plan = self.plan(epoch)
        skips = stages.SkipLog(self.root, self.strict)
        seeds = (self.seed, epoch, self.rank, worker)
        entries = plan.shards[worker]
        fmt = shards.frame_format
        raw = stages.train_passes(entries, skips, self.shuffle_buffer, seeds, self.split, fmt) \
            if self.mode == "train" else stages.sample_refs(stages.read(entries, skips, self.split, fmt), None)
        yield from stages.batches(raw, shards, skips, self.mode, self.batch_size,
                                  skip_per_worker(plan.quotas, position)[worker], plan.quotas[worker],
                                  plan.real_batches[worker], seeds)


class _WorkerDataset(IterableDataset):
    """The IterableDataset handed to torch's DataLoader; (epoch, position) come through shared memory
    because persistent workers keep the dataset object they were started with."""

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.control = multiprocessing.get_context().Array("q", 2, lock=False)  # epoch, position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        epoch, position = int(self.control[0]), int(self.control[1])
        plan = self.reader.plan(epoch)
        worker = ((info.id if info else 0) + next_worker(plan.quotas, position)) % len(plan.quotas)
        return self.reader.batches(epoch, worker, position)


def loader_workers(shards: ShardSet, split: str, world_size: int, wanted: int) -> int:
    """Workers for a split, lowered so every (rank, worker) reader owns at least one shard."""
    return min(wanted, max(len(shards.shards(split)) // world_size, 1)) if wanted else 0


class ShardStream:
    """Iterable of `Batch` for one rank; `len()` batches per epoch on every rank (`train.loader.plan`)."""

    def __init__(self, shards_dir: str | Path, split: str, batch_size: int, *, mode: Mode = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 128,
                 strict: bool = False, prefetch_factor: int = 2) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size <= 0 or shuffle_buffer <= 0 or num_workers < 0:
            raise ValueError("batch_size and shuffle_buffer must be positive and num_workers >= 0")
        self.shards = load_shard_set(shards_dir)
        self.root = manifest_path(shards_dir).parent.resolve()
        entries = self.shards.shards(split)
        readers = max(1, num_workers)
        if len(entries) < world_size * readers:
            raise ShardSetError(
                f"split {split!r} of {self.root} has {len(entries)} shards but world_size {world_size} x "
                f"{readers} worker(s) = {world_size * readers} readers need at least one each: reshard with a "
                f"smaller shard.max_count (`python -m pipeline shard --config CONFIG --set shard.max_count=N`) "
                f"or use fewer workers")
        self.split, self.batch_size, self.mode, self.num_workers = split, batch_size, mode, num_workers
        self._reader = _Reader(self.root, split, batch_size, mode, seed, rank, world_size, readers, shuffle_buffer,
                               strict)
        self._length = self._reader.plan(0).batches
        if self._length == 0:
            raise ShardSetError(f"split {split!r} holds {sum(e.count for e in entries)} samples, fewer than "
                                f"world_size {world_size} x batch_size {batch_size}: use a smaller batch size")
        self.epoch, self.position = 0, 0
        self.skipped_shards: set[str] = set()
        self._prefetch_factor = prefetch_factor
        self._dataset = _WorkerDataset(self._reader)
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles shards); a new epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        r = self._reader
        return {"epoch": self.epoch, "position": self.position, "seed": r.seed, "world_size": r.world_size,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "split": self.split,
                "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; the reading layout must be the same."""
        mine = self.state_dict()
        differ = {k: (state.get(k), mine[k]) for k in ("seed", "world_size", "num_workers", "batch_size", "split",
                                                       "mode") if state.get(k) != mine[k]}
        if differ:
            raise ShardSetError(f"cannot resume: the loader state was saved with other settings {differ} (saved, "
                                "now); resume with the same seed, world size, workers, batch size and split")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _batches(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            plan = self._reader.plan(self.epoch)
            streams = [self._reader.batches(self.epoch, w, self.position) for w in range(len(plan.quotas))]
            order = itertools.islice(round_robin(plan.quotas), self.position, None)
            return (next(streams[w]) for w in order)
        if self._loader is None:
            # its own generator: each new DataLoader iterator draws a base seed, from torch's global RNG by
            # default, which would shift the training RNG (dropout, drop-path) of a resumed run by one draw
            self._loader = DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers,
                                      persistent_workers=True, prefetch_factor=self._prefetch_factor,
                                      worker_init_fn=init_loader_worker,
                                      generator=torch.Generator().manual_seed(self._reader.seed))
        self._dataset.control[0], self._dataset.control[1] = self.epoch, self.position
        return iter(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= self._length:  # a finished epoch iterated again: a fresh pass over it
            self.position = 0
        batches = self._batches()
        try:
            for arrays in batches:
                batch = Batch.from_arrays(arrays)
                self.position += 1
                self.skipped_shards.update(batch.skipped_shards)
                yield batch
        except Exception:
            if self.num_workers:
                # torch stops workers only when its iterator is collected; a kept traceback delays that
                # to a cyclic GC that may close the queues first (then each join times out after 5 s)
                batches._shutdown_workers()
                self._loader = None
            raise
