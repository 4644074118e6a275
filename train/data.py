"""DDP-safe, resumable streaming loader over the WebDataset shard set (`pipeline.shard`).

Epoch plan (pure function of the manifest and (seed, epoch, rank, world_size, num_workers)):
shards are shuffled by (seed, epoch) in train mode (manifest order in eval mode), then dealt to
ranks (`[rank::world_size]`) and within a rank to workers (`[worker::num_workers]`), so every
reader owns whole shards and no sample is read twice. Per-sample shuffling uses a buffer seeded
from (seed, epoch, rank, worker); the training lead of each sample from (seed, epoch, rank,
worker, batch).

Equal batches per rank, by construction:
- train: every rank yields `total // (world_size * batch_size)` batches per epoch. A rank's
  quota is split over its workers in proportion to their samples; a worker whose shards hold fewer
  samples than its quota starts another pass over its shards (reshuffled), one with more stops
  early. So an epoch is "about one pass": a few samples may repeat or wait for the next epoch.
- eval: every sample exactly once across ranks; each worker's last batch and the extra batches a
  rank needs to match the busiest rank are padded with rows whose `valid` and `mask` are False.

Resume: `state_dict()` records (epoch, batches consumed); `load_state_dict()` makes the next
iteration replay each worker's deterministic stream and skip, undecoded, what was consumed.
Worker batches are merged round-robin by torch's DataLoader, which is deterministic, so the skip
per worker follows from the position alone.

Safety: only the members in `pipeline.shardset.SAMPLE_MEMBERS` (.npy / .json) are accepted and
.npy is decoded with allow_pickle=False; any other member (.pyd, .pth, .pickle ...) is refused
with an error. Each shard is verified (size, then sha256 against the manifest) the first time a
process opens it. Wrong size or unreadable tar = corrupt: counted (`Batch.skipped_shards`,
`ShardStream.skipped_shards`), logged once and skipped, or an error with strict=True. Same size
but another sha256 = the content was altered: refused with an error. Hashing costs about one
extra read of each shard (1.7k samples/s on the demo grid, raw tar reads 2.3k/s), paid once per
process and shard, so lazily rather than for the whole split at startup (benchmarks/loader.py).

Workers: each batch crosses to the main process as pickled numpy arrays (~3 MB at batch 16 on the
demo grid). On a busy 2-core machine that IPC made 1-2 workers slower than num_workers=0; workers
pay off where there are spare cores per rank (HPC nodes).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import multiprocessing
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from pipeline.shardset import SAMPLE_MEMBERS, ShardSetError, manifest_path, read_manifest, sha256_file
from train.batch import Batch, assemble

log = logging.getLogger(__name__)
Mode = Literal["train", "eval"]
_META = {"__key__", "__url__", "__local_path__"}


class CorruptShardError(ShardSetError):
    """A shard that is missing, truncated or not a readable tar (raised with strict=True)."""


class ShardIntegrityError(ShardSetError):
    """A shard whose content differs from the manifest, or that holds a member this loader refuses."""


@dataclass(frozen=True)
class Static:
    """Per-shard-set constants, loaded once per process (`load_static`)."""

    manifest: dict[str, Any]
    variables: list[str]
    targets: list[str]
    leads_h: list[int]
    stats_mean: np.ndarray
    stats_std: np.ndarray
    change_std: np.ndarray  # (n_leads, P) spread of each target's change over each lead, NaN if unknown
    patch_elevation: np.ndarray
    loss_mask: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    patch_size: int
    regions: tuple[int, int]
    grid: tuple[int, int]

    @property
    def input_std(self) -> np.ndarray:
        """float64 std with zeros replaced by 1, so a constant variable normalises to 0 instead of inf."""
        return np.where(self.stats_std > 0, self.stats_std, 1.0)

    @functools.cached_property
    def member_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each .npy sample member implied by the manifest."""
        (h, w), n_tok = self.grid, len(self.patch_elevation)
        return {"input.npy": (len(self.variables), h, w), "target.npy": (len(self.leads_h), len(self.targets), h, w),
                "scan_order.npy": (n_tok,), "scan_order_global.npy": (n_tok,), "wind_speed.npy": (n_tok,)}

    @property
    def target_index(self) -> list[int]:
        """Position of each target among the input variables."""
        return [self.variables.index(t) for t in self.targets]

    @property
    def target_mean(self) -> np.ndarray:
        """float32 (P,) statistics of the targets, for denormalising predictions."""
        return self.stats_mean[self.target_index].astype(np.float32)

    @property
    def target_std(self) -> np.ndarray:
        return self.input_std[self.target_index].astype(np.float32)


@functools.lru_cache(maxsize=8)
def _load_static(root: str, manifest_mtime_ns: int) -> Static:
    manifest = read_manifest(root)
    arrays = {}
    for name, entry in manifest["static"].items():
        path = Path(root) / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise ShardIntegrityError(f"static array {path} is missing or differs from the manifest: "
                                      "rerun `python -m pipeline shard --config CONFIG`")
        arrays[name] = np.load(path, allow_pickle=False)
    return Static(
        manifest=manifest, variables=manifest["variables"], targets=manifest["targets"],
        leads_h=manifest["leads_h"], stats_mean=np.asarray(manifest["stats"]["mean"], dtype=np.float64),
        stats_std=np.asarray(manifest["stats"]["std"], dtype=np.float64),
        change_std=np.array(manifest["stats"]["change_std"], dtype=np.float64),  # JSON null -> NaN
        patch_elevation=arrays["patch_elevation"], loss_mask=arrays["loss_mask"], lat=arrays["lat"],
        lon=arrays["lon"], patch_size=manifest["patch_size"], regions=tuple(manifest["regions"]),
        grid=tuple(manifest["grid"]),
    )


def load_static(shards_dir: str | Path) -> Static:
    """Manifest + static arrays of a shard set, cached per process (keyed by path and manifest mtime,
    so a rewritten shard set is reloaded)."""
    path = manifest_path(shards_dir).resolve()
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        mtime = -1  # read_manifest raises the error with the fix
    return _load_static(str(path.parent), mtime)


def _seed(*parts: int) -> int:
    """One 64-bit seed from several integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def _split_quota(total: int, weights: list[int]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder, ties to lower index)."""
    wsum = sum(weights)
    if wsum == 0:
        return [total // len(weights) + (i < total % len(weights)) for i in range(len(weights))]
    exact = [total * w / wsum for w in weights]
    quota = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - quota[i]), i))[: total - sum(quota)]:
        quota[i] += 1
    return quota


def skip_per_worker(quotas: list[int], position: int) -> list[int]:
    """Batches each worker has delivered after `position` batches of torch's round-robin merge."""
    done = [0] * len(quotas)
    for w in itertools.islice(_round_robin(quotas), position):
        done[w] += 1
    return done


def _round_robin(quotas: list[int]) -> Iterator[int]:
    """Worker ids in the order torch's DataLoader returns their batches (exhausted workers drop out)."""
    left = list(quotas)
    while any(left):
        for w, n in enumerate(left):
            if n:
                left[w] -= 1
                yield w


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch: per worker its shards (manifest entries) and batch quota."""

    shards: list[list[dict[str, Any]]]
    quotas: list[int]
    real_batches: list[int]  # eval: batches holding real samples; the rest of the quota is padding

    @property
    def batches(self) -> int:
        return sum(self.quotas)


def plan_epoch(entries: list[dict[str, Any]], *, mode: Mode, batch_size: int, seed: int, epoch: int,
               rank: int, world_size: int, readers: int) -> EpochPlan:
    """Deal shards to (rank, worker) readers and fix every worker's batch quota (see module doc)."""
    order = np.random.default_rng(_seed(seed, epoch)).permutation(len(entries)) if mode == "train" \
        else np.arange(len(entries))
    dealt = [[entries[i] for i in order[r::world_size]] for r in range(world_size)]
    per_worker = [[shards[w::readers] for w in range(readers)] for shards in dealt]
    counts = [[sum(s["count"] for s in ws) for ws in rank_workers] for rank_workers in per_worker]
    if mode == "train":
        per_rank = sum(map(sum, counts)) // (world_size * batch_size)
        quotas = _split_quota(per_rank, counts[rank])
        return EpochPlan(per_worker[rank], quotas, quotas)
    real = [[-(-c // batch_size) for c in rank_counts] for rank_counts in counts]
    busiest = max(map(sum, real))
    quotas = list(real[rank])
    for _ in range(busiest - sum(quotas)):  # pad the lighter ranks with all-padding batches
        quotas[int(np.argmin(quotas))] += 1
    return EpochPlan(per_worker[rank], quotas, real[rank])


class _ShardReader:
    """Reads raw (undecoded) samples of shards with webdataset, with integrity and safety checks.

    One per worker process; remembers which shards it verified and which it skipped.
    """

    _verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns): per process
    _logged: set[str] = set()

    def __init__(self, root: Path, strict: bool) -> None:
        self.root, self.strict = root, strict
        self.skipped: list[str] = []

    def _corrupt(self, name: str, why: str) -> None:
        msg = (f"shard {self.root / name} is corrupt ({why}): rerun `python -m pipeline shard --config CONFIG`,"
               " which rewrites damaged shards")
        if self.strict:
            raise CorruptShardError(msg)
        if name not in self.skipped:
            self.skipped.append(name)
        if str(self.root / name) not in self._logged:
            self._logged.add(str(self.root / name))
            log.warning("%s; skipping it (strict=False)", msg)

    def _verify(self, entry: dict[str, Any]) -> bool:
        path = self.root / entry["name"]
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._corrupt(entry["name"], "missing")
            return False
        ident = (str(path), stat.st_size, stat.st_mtime_ns)
        if ident in self._verified:
            return True
        if stat.st_size != entry["bytes"]:
            self._corrupt(entry["name"], f"{stat.st_size} bytes, manifest says {entry['bytes']}")
            return False
        if sha256_file(path) != entry["sha256"]:
            raise ShardIntegrityError(
                f"shard {path} has the manifest's size but another sha256: its content was altered after "
                "writing, so it is refused. Rewrite it with `python -m pipeline shard --config CONFIG`")
        self._verified.add(ident)
        return True

    def samples(self, entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard (member name -> bytes), after verification and the member check."""
        if not self._verify(entry):
            return
        errors: list[Exception] = []

        def handler(exc: Exception) -> bool:
            errors.append(exc)
            return False  # stop reading this shard

        path = self.root / entry["name"]
        try:
            for sample in group_by_keys(_tar_members(path), handler=handler):
                members = set(sample) - _META
                unknown = sorted(members - set(SAMPLE_MEMBERS))
                if unknown:
                    raise ShardIntegrityError(
                        f"shard {path} sample {sample['__key__']} holds member(s) {unknown}; only "
                        f"{list(SAMPLE_MEMBERS)} are accepted (pickle-based members are never decoded). The shard "
                        "set was not written by `python -m pipeline shard`: rewrite it with that command")
                if members != set(SAMPLE_MEMBERS):
                    errors.append(ValueError(f"sample {sample['__key__']} lacks "
                                             f"{sorted(set(SAMPLE_MEMBERS) - members)}"))
                    break
                yield sample
        except (tarfile.TarError, OSError, EOFError) as exc:
            errors.append(exc)
        if errors:
            self._corrupt(entry["name"], str(errors[0]))


def _tar_members(path: Path) -> Iterator[dict[str, Any]]:
    """Members of a local shard in webdataset's file-sample format, for its `group_by_keys`.

    Read with tarfile's seekable mode, one read per member: webdataset's own expander opens tars in
    stream mode, which reads in 10 KiB records and ran at 0.42x the raw tar rate on the demo shards.
    """
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if info.isreg():
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": str(path)}
            tar.members = []  # keep memory flat on large shards


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], str, int]] = {}


def _npy(raw: bytes) -> np.ndarray:
    """Decode .npy bytes (never pickle) as a read-only view.

    A member has the same header (dtype, shape) in every sample, so each distinct header is parsed
    once by np.load(allow_pickle=False), which refuses object dtypes; numpy evaluates headers with
    `ast`, and that alone cost more than the tar reading (benchmarks/loader.py).
    """
    if raw[:6] != b"\x93NUMPY" or raw[6] not in (1, 2, 3):
        return np.load(io.BytesIO(raw), allow_pickle=False)  # raises numpy's own error
    length_end = 10 if raw[6] == 1 else 12
    offset = length_end + int.from_bytes(raw[8:length_end], "little")
    meta = _NPY_HEADERS.get(raw[:offset])
    if meta is None:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        _NPY_HEADERS[raw[:offset]] = (arr.dtype, arr.shape, order, arr.size)
        return arr
    dtype, shape, order, count = meta
    return np.frombuffer(raw, dtype=dtype, offset=offset, count=count).reshape(shape, order=order)


def _decode(sample: dict[str, Any], static: Static) -> dict[str, Any]:
    """Decode the .npy (allow_pickle=False) and .json members and check shapes against the manifest."""
    out: dict[str, Any] = {"__key__": sample["__key__"]}
    for name in SAMPLE_MEMBERS:
        raw = sample[name]
        out[name] = json.loads(raw) if name.endswith(".json") else _npy(raw)
    for name, shape in static.member_shapes.items():
        if out[name].shape != shape:
            raise ShardSetError(f"sample {sample['__key__']} ({sample['__url__']}): {name} has shape "
                                f"{out[name].shape}, the manifest implies {shape}: rewrite the shard set")
    return out


class _Stream:
    """Everything one reader (rank, worker) needs to produce its batches; picklable for workers."""

    def __init__(self, root: Path, split: str, batch_size: int, mode: Mode, seed: int, rank: int,
                 world_size: int, readers: int, shuffle_buffer: int, strict: bool) -> None:
        self.root, self.split, self.batch_size, self.mode = root, split, batch_size, mode
        self.seed, self.rank, self.world_size, self.readers = seed, rank, world_size, readers
        self.shuffle_buffer, self.strict = shuffle_buffer, strict

    def plan(self, epoch: int) -> EpochPlan:
        entries = load_static(self.root).manifest["splits"][self.split]["shards"]
        return plan_epoch(entries, mode=self.mode, batch_size=self.batch_size, seed=self.seed, epoch=epoch,
                          rank=self.rank, world_size=self.world_size, readers=self.readers)

    def _raw(self, reader: _ShardReader, shards: list[dict[str, Any]], epoch: int, worker: int) -> Iterator[dict]:
        """Raw samples; train mode shuffles them and starts new passes (reshuffled) while needed."""
        if self.mode == "eval":
            for entry in shards:
                yield from reader.samples(entry)
            return
        rng = random.Random(_seed(self.seed, epoch, self.rank, worker))
        for n_pass in itertools.count():
            order = shards if n_pass == 0 else [shards[i] for i in
                                                np.random.default_rng(_seed(self.seed, epoch, self.rank, worker, n_pass))
                                                .permutation(len(shards))]
            seen = 0
            for sample in wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(
                    s for entry in order for s in reader.samples(entry)):
                seen += 1
                yield sample
            if seen == 0:
                raise CorruptShardError(f"worker {worker} of rank {self.rank} could not read a single sample from "
                                        f"its shards {[s['name'] for s in shards]}: rewrite the shard set")

    def batches(self, epoch: int, worker: int, position: int) -> Iterator[dict[str, Any]]:
        """This worker's batches of `epoch`, skipping those delivered before `position` (rank-wide)."""
        static = load_static(self.root)
        plan = self.plan(epoch)
        skip = skip_per_worker(plan.quotas, position)[worker]
        quota, real = plan.quotas[worker], plan.real_batches[worker]
        reader = _ShardReader(self.root, self.strict)
        raw = self._raw(reader, plan.shards[worker], epoch, worker)
        for _ in itertools.islice(raw, skip * self.batch_size if self.mode == "train" else min(skip, real) * self.batch_size):
            pass
        for index in range(skip, quota):
            if self.mode == "train":
                samples = [_decode(s, static) for s in itertools.islice(raw, self.batch_size)]
                leads = np.random.default_rng(_seed(self.seed, epoch, self.rank, worker, index, 1)).integers(
                    len(static.leads_h), size=self.batch_size)
                yield assemble(samples, static, leads, reader.skipped)
            else:
                got = [_decode(s, static) for s in itertools.islice(raw, self.batch_size)] if index < real else []
                yield assemble(got + [None] * (self.batch_size - len(got)), static, None, reader.skipped)


class _WorkerDataset(IterableDataset):
    """The IterableDataset handed to torch's DataLoader; (epoch, position) come through shared memory
    because persistent workers keep the dataset object they were started with."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.control = multiprocessing.get_context().Array("q", 2, lock=False)  # epoch, position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return self.stream.batches(int(self.control[0]), info.id if info else 0, int(self.control[1]))


class ShardStream:
    """Iterable of `Batch` for one rank; `len()` batches per epoch on every rank (module doc)."""

    def __init__(self, shards_dir: str | Path, split: str, batch_size: int, *, mode: Mode = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 64,
                 strict: bool = False, prefetch_factor: int = 2) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size <= 0 or shuffle_buffer <= 0 or num_workers < 0:
            raise ValueError("batch_size and shuffle_buffer must be positive and num_workers >= 0")
        self.static = load_static(shards_dir)
        self.root = manifest_path(shards_dir).parent.resolve()
        if split not in self.static.manifest["splits"]:
            raise ShardSetError(f"split {split!r} is not in {self.root} (it has {sorted(self.static.manifest['splits'])})")
        entries = self.static.manifest["splits"][split]["shards"]
        readers = max(1, num_workers)
        if len(entries) < world_size * readers:
            raise ShardSetError(
                f"split {split!r} of {self.root} has {len(entries)} shards but world_size {world_size} x "
                f"{readers} worker(s) = {world_size * readers} readers need at least one each: reshard with a "
                f"smaller shard.max_count (`python -m pipeline shard --config CONFIG --set shard.max_count=N`) "
                f"or use fewer workers")
        self.split, self.batch_size, self.mode, self.num_workers = split, batch_size, mode, num_workers
        self._stream = _Stream(self.root, split, batch_size, mode, seed, rank, world_size, readers, shuffle_buffer,
                               strict)
        self._length = self._stream.plan(0).batches
        if self._length == 0:
            total = sum(e["count"] for e in entries)
            raise ShardSetError(f"split {split!r} holds {total} samples, fewer than world_size {world_size} x "
                                f"batch_size {batch_size}: use a smaller batch size")
        self.epoch, self.position = 0, 0
        self.skipped_shards: set[str] = set()
        self._prefetch_factor = prefetch_factor
        self._dataset = _WorkerDataset(self._stream)
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles shards); a new epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        s = self._stream
        return {"epoch": self.epoch, "position": self.position, "seed": s.seed, "world_size": s.world_size,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "split": self.split,
                "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; the reading layout must be the same."""
        mine = self.state_dict()
        differ = {k: (state.get(k), mine[k]) for k in ("seed", "world_size", "num_workers", "batch_size", "split",
                                                       "mode") if state.get(k) != mine[k]}
        if differ:
            raise ValueError(f"cannot resume: the loader state was saved with other settings {differ} "
                             "(saved, now); resume with the same seed, world size, workers, batch size and split")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _batches(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            plan = self._stream.plan(self.epoch)
            streams = [self._stream.batches(self.epoch, w, self.position) for w in range(len(plan.quotas))]
            order = itertools.islice(_round_robin(plan.quotas), self.position, None)
            return (next(streams[w]) for w in order)
        if self._loader is None:
            self._loader = DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers,
                                      persistent_workers=True, prefetch_factor=self._prefetch_factor)
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
