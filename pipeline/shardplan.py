"""Which input times become samples, which frames a shard holds, and where shards are cut.

Pure functions of a split's `valid` flags, the leads in store steps and the shard limits, so the
writer (`pipeline.shard`) and the checks (`pipeline.shardset`) agree on one answer, and a rerun
plans exactly the shards an interrupted run planned.

Shard version 2 (DESIGN.md "Shards"): a shard holds a time-contiguous run of samples; each sample
position is an input frame, and the target times t + lead that lie inside the split and are not
input frames of the shard are target-only frames (the halo after the last sample, and positions
whose own input is skipped). A target past the split's end has no frame: its lead is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.records import Runs, ShardSpan

INPUT_MISSING = "input missing"  # skip reasons: the input time is a gap in the store,
TARGET_MISSING = "target missing"  # or a target time t + lead inside the split is
TAR_BLOCK, TAR_RECORD = 512, 10240  # tarfile's block and record sizes
TAR_END = 2 * TAR_BLOCK  # two zero blocks close an archive


def lead_steps(leads_h: Sequence[int], step_hours: int) -> list[int]:
    """Each lead in store steps (the config guarantees whole multiples of the step)."""
    return [lead // step_hours for lead in leads_h]


def classify(valid: np.ndarray, steps: Sequence[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per split position: which are samples, and which are skipped for each reason (boolean masks).

    A sample needs its input and every target inside the split; a target past the split's end is
    no reason to skip (the loader gives NaN there, masked in the loss).
    """
    n = len(valid)
    target_gap = np.zeros(n, dtype=bool)
    for s in steps:
        target_gap[: max(n - s, 0)] |= ~valid[s:]
    return valid & ~target_gap, {INPUT_MISSING: ~valid, TARGET_MISSING: valid & target_gap}


def to_runs(positions: Sequence[int]) -> Runs:
    """Sorted distinct positions as [start, stop) runs."""
    runs: Runs = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((int(p), int(p) + 1))
    return runs


def targets_of(position: int, steps: Sequence[int], n_times: int) -> set[int]:
    """The target positions of the sample at `position` that lie inside the split (the others have no frame)."""
    return {position + s for s in steps if position + s < n_times}


def frames_of(samples: Sequence[int], steps: Sequence[int], n_times: int) -> list[int]:
    """The frames a shard with these samples holds: the samples and their targets inside the split."""
    return sorted(set(samples).union(*(targets_of(p, steps, n_times) for p in samples)))


def member_bytes(length: int) -> int:
    """Bytes a tar member of `length` bytes takes: a header block plus the data padded to blocks."""
    return TAR_BLOCK + -(-length // TAR_BLOCK) * TAR_BLOCK


def tar_bytes(members: int) -> int:
    """Size of a tar file whose members take `members` bytes: the end blocks, padded to a record."""
    return -(-(members + TAR_END) // TAR_RECORD) * TAR_RECORD


@dataclass(frozen=True)
class FrameBytes:
    """Tar bytes of one input frame and of one target-only frame (members with headers)."""

    input: int
    target: int


def cut_shards(samples: Sequence[int], steps: Sequence[int], n_times: int, max_count: int, max_size: int,
               sizes: FrameBytes) -> list[ShardSpan]:
    """Cut the sample positions, in order, into shards of at most `max_count` samples whose tar file stays
    within `max_size` bytes (a single sample larger than that still gets its own shard)."""
    spans: list[ShardSpan] = []
    current: list[int] = []
    frames: set[int] = set()
    size = 0
    for p in samples:
        grow = _growth(p, steps, n_times, frames, sizes)
        if current and (len(current) == max_count or tar_bytes(size + grow) > max_size):
            spans.append(ShardSpan(samples=to_runs(current), frames=to_runs(sorted(frames))))
            current, frames, size = [], set(), 0
            grow = _growth(p, steps, n_times, frames, sizes)
        current.append(p)
        frames |= {p, *targets_of(p, steps, n_times)}
        size += grow
    if current:
        spans.append(ShardSpan(samples=to_runs(current), frames=to_runs(sorted(frames))))
    return spans


def _growth(p: int, steps: Sequence[int], n_times: int, frames: set[int], sizes: FrameBytes) -> int:
    """Bytes a shard holding `frames` grows by when sample `p` joins it (p's target-only frame, if it had
    one, becomes its input frame; targets not yet held join as target-only frames)."""
    new_targets = targets_of(p, steps, n_times) - frames
    return sizes.input - (sizes.target if p in frames else 0) + len(new_targets) * sizes.target
