"""The epoch plan: a pure function of the manifest and (seed, epoch, rank, world_size, workers).

Shards are shuffled by (seed, epoch) in train mode (manifest order in eval mode), then dealt to
ranks (`[rank::world_size]`) and within a rank to workers (`[worker::num_workers]`), so every reader
owns whole shards and no sample is read twice.

Equal batches per rank, by construction:
- train: every rank yields `total // (world_size * batch_size)` batches per epoch. A rank's quota is
  split over its workers in proportion to their samples; a worker whose shards hold fewer samples
  than its quota starts another pass over its shards (reshuffled), one with more stops early. So an
  epoch is "about one pass": a few samples may repeat or wait for the next epoch.
- eval: every sample exactly once across ranks; each worker's last batch and the extra batches a
  rank needs to match the busiest rank are padding (rows whose `valid` and `mask` are False).

Batches of a rank's workers are merged round-robin (torch's DataLoader order, exhausted workers
drop out), so how many batches each worker has delivered, and whose batch comes next, follow from
the rank's position alone (`skip_per_worker`, `next_worker`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from pipeline.records import ShardEntry

Mode = Literal["train", "eval"]


def seed_of(*parts: int) -> int:
    """One 64-bit seed from several integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def split_quota(total: int, weights: list[int]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder, ties to lower index)."""
    wsum = sum(weights)
    if wsum == 0:
        return [total // len(weights) + (i < total % len(weights)) for i in range(len(weights))]
    exact = [total * w / wsum for w in weights]
    quota = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - quota[i]), i))[: total - sum(quota)]:
        quota[i] += 1
    return quota


def round_robin(quotas: list[int]) -> Iterator[int]:
    """Worker ids in the order torch's DataLoader returns their batches (exhausted workers drop out)."""
    left = list(quotas)
    while any(left):
        for w, n in enumerate(left):
            if n:
                left[w] -= 1
                yield w


def skip_per_worker(quotas: list[int], position: int) -> list[int]:
    """Batches each worker has delivered after `position` batches of the round-robin merge."""
    done = [0] * len(quotas)
    for w in itertools.islice(round_robin(quotas), position):
        done[w] += 1
    return done


def next_worker(quotas: list[int], position: int) -> int:
    """The worker whose batch is number `position` of the merge (0 once the epoch is over).

    A resumed DataLoader asks its worker 0 first; rotating worker ids by this phase makes it the
    worker the interrupted run would have asked next, so the merged order continues exactly.
    """
    return next(itertools.islice(round_robin(quotas), position, None), 0)


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch: per worker its shards and batch quota."""

    shards: list[list[ShardEntry]]
    quotas: list[int]
    real_batches: list[int]  # eval: batches holding real samples; the rest of the quota is padding

    @property
    def batches(self) -> int:
        return sum(self.quotas)


def plan_epoch(entries: list[ShardEntry], *, mode: Mode, batch_size: int, seed: int, epoch: int,
               rank: int, world_size: int, readers: int) -> EpochPlan:
    """Deal shards to (rank, worker) readers and fix every worker's batch quota (see module doc)."""
    order = np.random.default_rng(seed_of(seed, epoch)).permutation(len(entries)) if mode == "train" \
        else np.arange(len(entries))
    dealt = [[entries[i] for i in order[r::world_size]] for r in range(world_size)]
    per_worker = [[shards[w::readers] for w in range(readers)] for shards in dealt]
    counts = [[sum(s.count for s in ws) for ws in rank_workers] for rank_workers in per_worker]
    if mode == "train":
        per_rank = sum(map(sum, counts)) // (world_size * batch_size)
        quotas = split_quota(per_rank, counts[rank])
        return EpochPlan(per_worker[rank], quotas, quotas)
    real = [[-(-c // batch_size) for c in rank_counts] for rank_counts in counts]
    busiest = max(map(sum, real))
    quotas = list(real[rank])
    for _ in range(busiest - sum(quotas)):  # pad the lighter ranks with all-padding batches
        quotas[int(np.argmin(quotas))] += 1
    return EpochPlan(per_worker[rank], quotas, real[rank])
