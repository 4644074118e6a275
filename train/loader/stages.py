"""The generator stages one reader (a rank's worker) runs, webdataset-style:
read (whole shards, verified) -> sample refs (shuffled inside each shard in train mode) -> shuffle
buffer (train) -> decode (assemble each sample from its shard's frames) -> batch.

Safety: only the frame members of `pipeline.codec` (.npy / .json) are accepted, and .npy is decoded
with allow_pickle=False; any other member (.pyd, .pth, .pickle ...) is refused with an error. A shard
is small (a run of time steps), so it is read whole, and the first time a process reads it its
bytes are checked against the manifest in memory (size, then sha256: no second read). Wrong size,
unreadable tar or frames other than the manifest lists = corrupt: counted (`Batch.skipped_shards`),
logged once and skipped, or an error with strict=True. Same size but another sha256, or a member no
writer puts there = altered: refused.

Order in train mode: the plan shuffles the shard order globally per epoch; each shard's samples are
permuted, then pass through webdataset's shuffle buffer, which mixes neighbouring shards. A sample
travels as a ref (its shard's frames, its position) and is decoded only when it goes into a batch, so
a resumed reader skips delivered samples undecoded.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds

from pipeline.codec import FrameFormat, Sample, ShardFrames
from pipeline.records import ShardEntry, run_positions
from pipeline.shardset import frame_problems, parse_frames, shard_problem
from topoflow.errors import ShardSetError
from train.batch import assemble, draw_leads
from train.loader.plan import Mode, seed_of
from train.shards import ShardSet

log = logging.getLogger(__name__)
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) verified by this process
_LOGGED: set[str] = set()
_FIX = "`python -m pipeline shard --config CONFIG`"
SampleRef = tuple[ShardFrames, int]  # a sample not yet decoded: its shard's frames and its split position


class CorruptShardError(ShardSetError):
    """A shard that is missing, truncated or not a readable tar (raised with strict=True)."""


class ShardIntegrityError(ShardSetError):
    """A shard whose content differs from the manifest, or that holds a member this loader refuses."""


class SkipLog:
    """The corrupt shards one reader skipped (or, with strict=True, refuses)."""

    def __init__(self, root: Path, strict: bool) -> None:
        self.root, self.strict = root, strict
        self.skipped: list[str] = []

    def corrupt(self, name: str, why: str) -> None:
        msg = f"shard {self.root / name} is corrupt ({why}): rerun {_FIX}, which rewrites damaged shards"
        if self.strict:
            raise CorruptShardError(msg)
        if name not in self.skipped:
            self.skipped.append(name)
        if str(self.root / name) not in _LOGGED:
            _LOGGED.add(str(self.root / name))
            log.warning("%s; skipping it (strict=False)", msg)


def _read_verified(entry: ShardEntry, skips: SkipLog) -> bytes | None:
    """A shard's bytes, checked against the manifest once per process; None (skipped) if corrupt."""
    path = skips.root / entry.name
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            data = fh.read() if stat.st_size == entry.bytes else None  # a wrong size is corrupt unread
    except OSError as exc:
        skips.corrupt(entry.name, "missing" if isinstance(exc, FileNotFoundError) else str(exc))
        return None
    ident = (str(path), stat.st_size, stat.st_mtime_ns)
    if ident in _VERIFIED:
        return data
    problem = shard_problem(path, entry, data)
    if problem is not None and problem.altered:
        raise ShardIntegrityError(f"shard {path} has the manifest's size but another sha256: its content was "
                                  f"altered after writing, so it is refused. Rewrite it with {_FIX}")
    if problem is not None:
        skips.corrupt(entry.name, str(problem))
        return None
    _VERIFIED.add(ident)
    return data


def read(entries: Iterable[ShardEntry], skips: SkipLog, split: str, fmt: FrameFormat) -> Iterator[ShardFrames]:
    """Each shard read whole and verified, its frames checked against the manifest's span."""
    for entry in entries:
        data = _read_verified(entry, skips)
        if data is None:
            continue
        path = skips.root / entry.name
        try:
            frames, strange = parse_frames(data, split)
        except (tarfile.TarError, EOFError) as exc:
            skips.corrupt(entry.name, f"unreadable tar: {exc}")
            continue
        problems = frame_problems(frames, strange, entry, split, entry.name)
        altered = [p for p in problems if p.altered]
        if altered:
            raise ShardIntegrityError(f"shard {path}: {altered[0]}. The shard set was not written by "
                                      f"`python -m pipeline shard`: rewrite it with {_FIX}")
        if problems:
            skips.corrupt(entry.name, str(problems[0]))
            continue
        yield ShardFrames(frames, entry, split, str(path), fmt)


def sample_refs(shards: Iterable[ShardFrames], rng: np.random.Generator | None) -> Iterator[SampleRef]:
    """Each shard's samples: in time order (eval), or permuted inside the shard (train: `rng`)."""
    for frames in shards:
        positions = run_positions(frames.span.samples)
        for position in positions if rng is None else rng.permutation(positions).tolist():
            yield frames, position


def train_passes(entries: list[ShardEntry], skips: SkipLog, buffer: int, seeds: tuple[int, ...], split: str,
                 fmt: FrameFormat) -> Iterator[SampleRef]:
    """Shuffled sample refs, pass after pass (each later pass in a new shard order), as long as asked."""
    rng = random.Random(seed_of(*seeds))
    for n_pass in itertools.count():
        order = entries if n_pass == 0 else \
            [entries[i] for i in np.random.default_rng(seed_of(*seeds, n_pass)).permutation(len(entries))]
        local = np.random.default_rng(seed_of(*seeds, n_pass, 2))
        seen = 0
        for ref in wds.shuffle(buffer, buffer, rng=rng)(sample_refs(read(order, skips, split, fmt), local)):
            seen += 1
            yield ref
        if seen == 0:
            raise CorruptShardError(f"no sample could be read from the shards {[s.name for s in entries]}: rewrite "
                                    f"the shard set with {_FIX}")


def decode(refs: Iterator[SampleRef], count: int) -> list[Sample]:
    """The next `count` samples (fewer at the end), assembled and decoded."""
    return [frames.sample(position) for frames, position in itertools.islice(refs, count)]


def batches(raw: Iterator[SampleRef], shards: ShardSet, skips: SkipLog, mode: Mode, batch_size: int,
            first: int, quota: int, real: int, lead_seeds: tuple[int, ...]) -> Iterator[dict[str, Any]]:
    """Batches number first..quota-1 of one reader; eval batches past `real` are all padding.

    Train batches draw one lead per sample (`draw_leads`) from (lead_seeds, batch number), so a resumed
    run draws the same leads.
    """
    skip = first if mode == "train" else min(first, real)
    for _ in itertools.islice(raw, skip * batch_size):  # skipped undecoded
        pass
    for index in range(first, quota):
        if mode == "train":
            samples = decode(raw, batch_size)
            leads = draw_leads(samples, shards, np.random.default_rng(seed_of(*lead_seeds, index, 1)), batch_size)
            yield assemble(samples, shards, leads, skips.skipped)
        else:
            got = decode(raw, batch_size) if index < real else []
            yield assemble(got + [None] * (batch_size - len(got)), shards, None, skips.skipped)
