"""The streaming loader (`train.loader`): DDP/worker partitioning, resume, batch content, safety, and
the full model input assembled on the device (`train.inputs`)."""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.codec import TargetFields
from pipeline.features import COORDINATE_LAYERS
from pipeline.records import ShardEntry, run_positions
from pipeline.shardset import read_manifest
from tests.helpers import StoreSamples, rehash_shard
from topoflow.errors import ShardSetError
from train.batch import Batch, draw_leads
from train.inputs import InputAssembler
from train.loader import CorruptShardError, ShardIntegrityError, ShardStream, stages
from train.loader.plan import next_worker, plan_epoch, round_robin, skip_per_worker
from train.shards import load_shard_set


def all_keys(shards: Path, split: str) -> set[str]:
    """Keys of a split's samples: its input frames, read from the tars (target-only frames are no samples)."""
    keys = set()
    for shard in read_manifest(shards).splits[split].shards:
        with tarfile.open(shards / shard.name) as tar:
            keys |= {m.name.split(".")[0] for m in tar if m.name.endswith(".input.npy")}
    return keys


def valid_keys(batch: Batch) -> list[str]:
    return [k for k, ok in zip(batch.keys, batch.valid.tolist()) if ok]


def copy_shards(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def test_eval_two_ranks_two_workers_cover_the_split_exactly_once(tiny_shards: Path) -> None:
    per_rank, lengths = [], []
    for rank in range(2):
        loader = ShardStream(tiny_shards, "train", 3, mode="eval", rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        lengths.append(len(loader))
        keys = [k for b in batches for k in valid_keys(b)]
        assert len(keys) == len(set(keys))
        per_rank.append(set(keys))
        padding = [(b, i) for b in batches for i, ok in enumerate(b.valid.tolist()) if not ok]
        assert padding and all(not b.mask[i].any() for b, i in padding)
        assert all(b.y.shape == (3, 3, 6, 8, 16) and b.lead_times.tolist() == [3.0, 6.0, 12.0] for b in batches)
    assert lengths[0] == lengths[1]
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == all_keys(tiny_shards, "train")


def test_train_ranks_and_workers_disjoint_with_equal_batches(tiny_shards: Path) -> None:
    epochs = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in range(2):
            loader = ShardStream(tiny_shards, "train", 2, mode="train", seed=7, rank=rank, world_size=2, num_workers=2)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 6  # 24 samples // (2 ranks x 2)
            assert all(b.valid.all() and b.y.shape == (2, 6, 8, 16) and b.lead_times.shape == (2,) for b in batches)
            per_rank.append([k for b in batches for k in b.keys])
        assert not set(per_rank[0]) & set(per_rank[1])
        assert set(per_rank[0]) | set(per_rank[1]) == all_keys(tiny_shards, "train")
        epochs[epoch] = per_rank
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    again = ShardStream(tiny_shards, "train", 2, seed=7, rank=0, world_size=2, num_workers=2)
    again.set_epoch(1)
    assert [k for b in again for k in b.keys] == epochs[1][0]  # deterministic given (seed, epoch, rank)


@pytest.mark.parametrize(("mode", "workers", "stop"), [("train", 0, 4), ("train", 2, 4), ("train", 2, 3),
                                                       ("train", 3, 5), ("eval", 2, 3)])
def test_resume_yields_exactly_the_remaining_batches(tiny_shards: Path, mode: str, workers: int, stop: int) -> None:
    """At any worker count and any position: the resumed DataLoader starts at worker 0, so worker ids are
    rotated by the position's round-robin phase (an odd position used to swap the next two batches)."""
    def make() -> ShardStream:
        loader = ShardStream(tiny_shards, "train", 2, mode=mode, seed=3, num_workers=workers, shuffle_buffer=5)
        loader.set_epoch(2)
        return loader

    full = [(b.keys, b.lead_times.tolist(), b.x.sum().item()) for b in make()]
    first = make()
    taken = []
    for batch in first:
        taken.append(batch.keys)
        if len(taken) == stop:
            break
    state = first.state_dict()
    assert state["position"] == stop and state["epoch"] == 2
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    rest = [(b.keys, b.lead_times.tolist(), b.x.sum().item()) for b in resumed]
    assert taken == [k for k, _, _ in full[:stop]]
    assert rest == full[stop:]
    # iterating the interrupted loader again continues too
    assert [b.keys for b in first] == [k for k, _, _ in full[stop:]]


def test_resume_with_other_settings_is_refused(tiny_shards: Path) -> None:
    state = ShardStream(tiny_shards, "train", 2, num_workers=0).state_dict()
    with pytest.raises(ShardSetError, match="num_workers"):
        ShardStream(tiny_shards, "train", 2, num_workers=1).load_state_dict(state)


def test_batch_is_normalised_and_masked(tiny_store, tiny_shards: Path) -> None:
    """Batches hold the store's values, normalised; targets past the split (NaN) and off the loss mask are
    masked out and zero."""
    static = load_shard_set(tiny_shards)
    tidx = static.target_index
    store = StoreSamples(tiny_store.data.store, tiny_store.data.splits["test"], static.leads_h, static.targets)
    mean, std = static.stats_mean, static.input_std
    past = 0
    for mode in ("eval", "train"):
        for batch in ShardStream(tiny_shards, "test", 4, mode=mode):
            for i, key in enumerate(batch.keys):
                p = int(key.rsplit("_", 1)[1])
                np.testing.assert_allclose(batch.x[i].numpy(), (store.fields[p] - mean[:, None, None]) /
                                           std[:, None, None], rtol=1e-5, atol=1e-5)
                target = store.targets(p)
                if mode == "train":
                    target = target[static.leads_h.index(int(batch.lead_times[i]))]
                past += int(np.isnan(target).all(axis=(-3, -2, -1)).sum())
                expect = np.isfinite(target) & static.loss_mask
                np.testing.assert_array_equal(batch.mask[i].numpy(), expect)
                norm = (target - mean[tidx][:, None, None]) / std[tidx][:, None, None]
                np.testing.assert_allclose(batch.y[i].numpy()[expect], norm[expect], rtol=1e-5, atol=1e-5)
                assert (batch.y[i].numpy()[~expect] == 0).all()
                np.testing.assert_array_equal(batch.scan_order[i].numpy(), store.per_time["scan_order"][p])
                np.testing.assert_array_equal(batch.wind_speed[i].numpy(), store.per_time["wind_speed"][p])
    assert past > 0  # eval batches hold leads past the split's end
    assert not static.loss_mask.all()  # the static mask really removes cells


def test_train_order_shuffles_inside_each_shard(tiny_shards: Path) -> None:
    """With a one-sample buffer the train stream is the plan's shard order, each shard's samples permuted
    (not in time order), and the same again for the same (seed, epoch)."""
    def keys(seed: int) -> list[str]:
        return [k for b in ShardStream(tiny_shards, "train", 4, seed=seed, shuffle_buffer=1) for k in b.keys]

    shards = read_manifest(tiny_shards).splits["train"].shards
    run = keys(5)
    assert run == keys(5) and run != keys(6)
    blocks = [run[i: i + 4] for i in range(0, 24, 4)]
    of_shard = {f"train_{p:08d}": n for n, s in enumerate(shards) for p in run_positions(s.samples)}
    assert all(len({of_shard[k] for k in block}) == 1 for block in blocks)  # a batch = one shard's samples here
    assert any(block != sorted(block) for block in blocks)


def test_an_older_shard_version_is_refused_with_the_fix(tiny_shards: Path, tmp_path: Path) -> None:
    shards = copy_shards(tiny_shards, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "shard_version": 1}))
    with pytest.raises(ShardSetError, match=r"shard version 1.*re-run `python -m pipeline shard"):
        ShardStream(shards, "train", 2)


def test_batch_helpers(tiny_shards: Path) -> None:
    batch = next(iter(ShardStream(tiny_shards, "val", 2)))
    assert batch.order_for("regional") is batch.scan_order
    assert batch.order_for("global") is batch.scan_order_global
    assert batch.order_for("none") is None
    with pytest.raises(ValueError, match="unknown scan"):
        batch.order_for("diagonal")
    moved = batch.to("cpu")
    assert moved.scan_order.dtype == torch.int64 and moved.keys == batch.keys


def test_shard_set_is_loaded_once_and_matches_files(tiny_shards: Path) -> None:
    static = load_shard_set(tiny_shards)
    assert load_shard_set(tiny_shards / "manifest.json") is static
    np.testing.assert_array_equal(static.loss_mask, np.load(tiny_shards / "loss_mask.npy"))
    assert static.patch_elevation.shape == (32,) and static.layout.grid == (8, 16) and static.layout.regions == (2, 2)


def test_full_input_joins_static_and_coordinate_channels_in_the_configs_order(tiny_shards: Path) -> None:
    shards = load_shard_set(tiny_shards)
    stats = shards.manifest.statistics
    batch = next(iter(ShardStream(tiny_shards, "val", 3, mode="eval")))
    full = InputAssembler(shards, "cpu")(batch.x)
    assert full.shape == (3, 15, 8, 16) and batch.x.shape == (3, 11, 8, 16)
    record = shards.record
    for c, name in enumerate(record.variable_names):
        kind = next(v.kind for v in record.variables if v.name == name)
        if kind == "dynamic":
            want = batch.x[:, record.names("dynamic").index(name)].numpy()
        elif kind == "static":
            i = record.names("static").index(name)
            want = (shards.static[i] - stats.static_mean[i]) / stats.static_std[i]
        else:
            layer = COORDINATE_LAYERS[name](shards.lat, shards.lon)
            want = (layer - layer.mean()) / layer.std()
        np.testing.assert_allclose(full[:, c].numpy(), np.broadcast_to(want, (3, 8, 16)), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_truncated_shard_is_skipped_counted_and_logged_once(tiny_shards: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    shards = copy_shards(tiny_shards, tmp_path)
    bad = shards / "train-000002.tar"
    bad.write_bytes(bad.read_bytes()[:7000])
    loader = ShardStream(shards, "train", 2)
    with caplog.at_level(logging.WARNING, logger="train.loader.stages"):
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)  # the quota is filled from the other shards
            assert not any(k.startswith("train_0000000") and int(k[-2:]) in range(8, 12) for b in batches
                           for k in b.keys)
    assert loader.skipped_shards == {"train-000002.tar"}
    assert len([r for r in caplog.records if "train-000002.tar" in r.getMessage()]) == 1
    with pytest.raises(CorruptShardError, match="train-000002.tar.*pipeline shard"):
        list(ShardStream(shards, "train", 2, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_byte_is_refused(tiny_shards: Path, tmp_path: Path, workers: int) -> None:
    shards = copy_shards(tiny_shards, tmp_path)
    bad = shards / "train-000003.tar"
    raw = bytearray(bad.read_bytes())
    raw[3000] ^= 0x01
    bad.write_bytes(bytes(raw))
    with pytest.raises(ShardIntegrityError, match="train-000003.tar.*sha256"):
        list(ShardStream(shards, "train", 2, num_workers=workers))


def test_each_shard_is_read_whole_and_hashed_once_per_process(tiny_shards: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shards = copy_shards(tiny_shards, tmp_path)  # a new path: not yet verified by this process
    calls, real = [], stages.shard_problem

    def counting(path: Path, entry: ShardEntry, data: bytes | None = None):  # noqa: ANN202
        calls.append((path.name, data is not None))
        return real(path, entry, data)

    monkeypatch.setattr(stages, "shard_problem", counting)
    loader = ShardStream(shards, "train", 2)
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert len(list(loader)) == len(loader)
    names = sorted(s.name for s in read_manifest(shards).splits["train"].shards)
    assert sorted(calls) == [(name, True) for name in names]  # hashed from the bytes read, not read again


class _Tripwire:
    """Unpickling this creates a file: proof that a planted pickle was (not) executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_planted_pickle_member_is_refused_and_never_unpickled(tiny_shards: Path, tmp_path: Path) -> None:
    shards = copy_shards(tiny_shards, tmp_path)
    tripwire = tmp_path / "unpickled"
    payload = pickle.dumps(_Tripwire(tripwire))
    with tarfile.open(shards / "train-000000.tar", "a") as tar:
        info = tarfile.TarInfo("train_00000001.evil.pyd")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    rehash_shard(shards, "train-000000.tar")  # a consistent, tampered shard set
    with pytest.raises(ShardIntegrityError, match="evil.pyd"):
        list(ShardStream(shards, "train", 2, mode="eval"))
    assert not tripwire.exists()


def test_too_few_shards_is_a_clear_error(tiny_shards: Path) -> None:
    with pytest.raises(ShardSetError, match=r"2 shards .* 4 readers .*shard.max_count.*fewer workers"):
        ShardStream(tiny_shards, "val", 2, world_size=2, num_workers=2)
    with pytest.raises(ShardSetError, match="smaller batch size"):
        ShardStream(tiny_shards, "val", 64)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 9), min_size=1, max_size=16), world=st.integers(1, 3),
       readers=st.integers(1, 3), batch=st.integers(1, 4), seed=st.integers(0, 5), epoch=st.integers(0, 3))
def test_plan_deals_every_shard_once_and_balances_ranks(counts: list[int], world: int, readers: int, batch: int,
                                                       seed: int, epoch: int) -> None:
    assume(len(counts) >= world * readers)
    entries = [ShardEntry(name=f"s{i}", samples=[(0, c)], frames=[(0, c)], bytes=1, sha256="")
               for i, c in enumerate(counts)]
    for mode in ("train", "eval"):
        plans = [plan_epoch(entries, mode=mode, batch_size=batch, seed=seed, epoch=epoch, rank=r,
                            world_size=world, readers=readers) for r in range(world)]
        names = [s.name for p in plans for ws in p.shards for s in ws]
        assert sorted(names) == sorted(e.name for e in entries)  # each shard to exactly one reader
        assert len({p.batches for p in plans}) == 1  # equal batches on every rank
        if mode == "train":
            assert plans[0].batches == sum(counts) // (world * batch)
        else:
            for p in plans:  # real batches hold every sample of the rank's shards
                assert all(r * batch >= sum(s.count for s in ws) for r, ws in zip(p.real_batches, p.shards))
                assert all(q >= r for q, r in zip(p.quotas, p.real_batches))


@given(quotas=st.lists(st.integers(0, 6), min_size=1, max_size=4), data=st.data())
def test_skip_per_worker_counts_round_robin_delivery(quotas: list[int], data: st.DataObject) -> None:
    position = data.draw(st.integers(0, sum(quotas)))
    done = skip_per_worker(quotas, position)
    assert sum(done) == position and all(d <= q for d, q in zip(done, quotas))
    # round robin: no worker with batches left is more than one batch ahead of another such worker
    live = [d for d, q in zip(done, quotas) if d < q]
    assert not live or max(live) - min(live) <= 1


@given(quotas=st.lists(st.integers(0, 6), min_size=1, max_size=4), data=st.data())
def test_rotating_workers_by_the_phase_continues_the_round_robin(quotas: list[int], data: st.DataObject) -> None:
    """A resumed DataLoader merges worker (k + phase) % n in torch's order from k = 0: the same sequence."""
    position = data.draw(st.integers(0, sum(quotas)))
    done, phase, n = skip_per_worker(quotas, position), next_worker(quotas, position), len(quotas)
    left = [q - d for q, d in zip(quotas, done)]
    resumed = [(k + phase) % n for k in round_robin([left[(k + phase) % n] for k in range(n)])]
    assert resumed == list(round_robin(quotas))[position:]


@settings(max_examples=60, deadline=None)
@given(usable=st.lists(st.lists(st.sampled_from(["target", "off-mask", "past"]), min_size=3, max_size=3), min_size=1,
                       max_size=6), seed=st.integers(0, 2**32))
def test_draw_leads_picks_a_lead_with_a_target_and_keeps_usable_first_draws(usable: list[list[str]], seed: int) -> None:
    """Samples whose targets end inside the split keep their draw; others move to a lead with a target. A lead
    has none past the split (no frame) or where its only finite cells are off the loss mask."""
    shards = SimpleNamespace(leads_h=[3, 6, 12], loss_mask=np.array([[True, False]]))
    samples = []
    for kinds in usable:
        targets = []
        for kind in kinds:
            fields = np.full((2, 1, 2), np.nan, dtype=np.float32)
            fields[0, 0, 1] = 1.0  # finite but off the loss mask: not a target to learn from
            fields[1, 0, 0] = 1.0 if kind == "target" else np.nan
            targets.append(None if kind == "past" else TargetFields(fields, (0, 1)))
        samples.append(SimpleNamespace(targets=tuple(targets)))
    first = np.random.default_rng(seed).integers(3, size=len(usable))
    drawn = draw_leads(samples, shards, np.random.default_rng(seed), len(usable))
    for kinds, a, b in zip(usable, first, drawn):
        if kinds[a] == "target" or "target" not in kinds:
            assert b == a
        else:
            assert kinds[b] == "target"
