"""The generator stages one reader (a rank's worker) runs, webdataset-style:
verify -> read -> shuffle (train) -> decode -> batch.

Safety: only the sample members of `pipeline.codec` (.npy / .json) are accepted, and .npy is decoded
with allow_pickle=False; any other member (.pyd, .pth, .pickle ...) is refused with an error. Each
shard is verified (size, then sha256 against the manifest) the first time a process opens it. Wrong
size or unreadable tar = corrupt: counted (`Batch.skipped_shards`), logged once and skipped, or an
error with strict=True. Same size but another sha256 = the content was altered: refused. Hashing
costs about one extra read of each shard, paid once per process and shard, lazily rather than for
the whole split at startup (benchmarks/loader.py).
"""

from __future__ import annotations

import itertools
import logging
import random
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys

from pipeline.codec import SAMPLE_MEMBERS, decode_sample
from pipeline.records import ShardEntry
from pipeline.shardset import shard_problem, tar_members
from topoflow.errors import ShardSetError
from train.batch import assemble, draw_leads
from train.loader.plan import Mode, seed_of
from train.shards import ShardSet

log = logging.getLogger(__name__)
_META = {"__key__", "__url__", "__local_path__"}
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) verified by this process
_LOGGED: set[str] = set()


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
        msg = (f"shard {self.root / name} is corrupt ({why}): rerun `python -m pipeline shard --config CONFIG`,"
               " which rewrites damaged shards")
        if self.strict:
            raise CorruptShardError(msg)
        if name not in self.skipped:
            self.skipped.append(name)
        if str(self.root / name) not in _LOGGED:
            _LOGGED.add(str(self.root / name))
            log.warning("%s; skipping it (strict=False)", msg)


def verify(entries: list[ShardEntry], skips: SkipLog) -> Iterator[ShardEntry]:
    """Shards that match the manifest (checked once per process); corrupt ones are skipped, altered refused."""
    for entry in entries:
        path = skips.root / entry.name
        try:
            stat = path.stat()
        except FileNotFoundError:
            skips.corrupt(entry.name, "missing")
            continue
        ident = (str(path), stat.st_size, stat.st_mtime_ns)
        if ident not in _VERIFIED:
            problem = shard_problem(path, entry)
            if problem is not None and problem.altered:
                raise ShardIntegrityError(f"shard {path} has the manifest's size but another sha256: its content was "
                                          "altered after writing, so it is refused. Rewrite it with "
                                          "`python -m pipeline shard --config CONFIG`")
            if problem is not None:
                skips.corrupt(entry.name, str(problem))
                continue
            _VERIFIED.add(ident)
        yield entry


def read(entries: Iterator[ShardEntry], skips: SkipLog) -> Iterator[dict[str, Any]]:
    """Raw samples (member name -> bytes) of each shard; a shard that breaks off counts as corrupt."""
    for entry in entries:
        errors: list[Exception] = []

        def handler(exc: Exception) -> bool:
            errors.append(exc)
            return False  # stop reading this shard

        path = skips.root / entry.name
        try:
            for sample in group_by_keys(tar_members(path), handler=handler):
                unknown = sorted(set(sample) - _META - set(SAMPLE_MEMBERS))
                if unknown:
                    raise ShardIntegrityError(
                        f"shard {path} sample {sample['__key__']} holds member(s) {unknown}; only "
                        f"{list(SAMPLE_MEMBERS)} are accepted (pickle-based members are never decoded). The shard "
                        "set was not written by `python -m pipeline shard`: rewrite it with that command")
                if set(sample) - _META != set(SAMPLE_MEMBERS):
                    errors.append(ValueError(f"sample {sample['__key__']} lacks "
                                             f"{sorted(set(SAMPLE_MEMBERS) - set(sample))}"))
                    break
                yield sample
        except (tarfile.TarError, OSError, EOFError) as exc:
            errors.append(exc)
        if errors:
            skips.corrupt(entry.name, str(errors[0]))


def train_passes(entries: list[ShardEntry], skips: SkipLog, buffer: int, seeds: tuple[int, ...]) -> Iterator[dict]:
    """Shuffled raw samples, pass after pass (each later pass in a new shard order), as long as asked."""
    rng = random.Random(seed_of(*seeds))
    for n_pass in itertools.count():
        order = entries if n_pass == 0 else \
            [entries[i] for i in np.random.default_rng(seed_of(*seeds, n_pass)).permutation(len(entries))]
        seen = 0
        for sample in wds.shuffle(buffer, buffer, rng=rng)(read(verify(order, skips), skips)):
            seen += 1
            yield sample
        if seen == 0:
            raise CorruptShardError(f"no sample could be read from the shards {[s.name for s in entries]}: rewrite "
                                    "the shard set with `python -m pipeline shard --config CONFIG`")


def decode(samples: Iterator[dict[str, Any]], shards: ShardSet) -> Iterator[dict[str, Any]]:
    for sample in samples:
        yield decode_sample(sample, shards.member_shapes)


def batches(raw: Iterator[dict[str, Any]], shards: ShardSet, skips: SkipLog, mode: Mode, batch_size: int,
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
            samples = list(decode(itertools.islice(raw, batch_size), shards))
            leads = draw_leads(samples, shards, np.random.default_rng(seed_of(*lead_seeds, index, 1)), batch_size)
            yield assemble(samples, shards, leads, skips.skipped)
        else:
            got = list(decode(itertools.islice(raw, batch_size), shards)) if index < real else []
            yield assemble(got + [None] * (batch_size - len(got)), shards, None, skips.skipped)
