"""`python -m pipeline shard` and shard-set validation, on a real build of the tiny source."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.__main__ import main as pipeline_main
from pipeline.codec import FRAME_MEMBERS, STATIC_MEMBERS, FrameFormat, ShardFrames
from pipeline.config import PipelineConfig
from pipeline.records import run_positions
from pipeline.shard import TAR_MTIME, TAR_OWNER, frame_bytes, write_shards
from pipeline.shardplan import INPUT_MISSING, TARGET_MISSING, FrameBytes, classify, cut_shards, tar_bytes, to_runs
from pipeline.shardset import read_manifest, summarize_shard_set, validate_shard_set
from pipeline.store import open_features
from tests.helpers import StoreSamples, plant_pickled_input, read_tar_frames, rehash_shard
from topoflow.errors import ShardSetError, StoreError
from topoflow.files import sha256_file


def npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def with_shards_dir(cfg: PipelineConfig, path: Path, **shard: int) -> PipelineConfig:
    data = cfg.data.model_copy(update={"shards": path})
    return cfg.model_copy(update={"data": data, "shard": cfg.shard.model_copy(update=shard)})


def _frames_equal_store(frames: dict[int, dict[str, bytes]], inputs: set[int], split: str, store: StoreSamples) -> None:
    """Each frame holds its time's store row: input frames the dynamic fields, orders and wind speed;
    target-only frames the target fields."""
    for p, members in frames.items():
        kind = "input" if p in inputs else "target"
        assert set(members) == set(FRAME_MEMBERS[kind])
        if kind == "input":
            np.testing.assert_array_equal(npy(members["input.npy"]), store.fields[p])  # dynamic channels only
            for name, values in store.per_time.items():
                arr = npy(members[f"{name}.npy"])
                np.testing.assert_array_equal(arr, values[p])
                assert arr.dtype == values.dtype
        else:
            np.testing.assert_array_equal(npy(members["target.npy"]), store.fields[p][store.tvars])
        meta = json.loads(members["meta.json"])
        assert np.datetime64(meta["time"]) == store.times[p] and meta["key"] == f"{split}_{p:08d}"


def assert_every_sample_equals_the_store(cfg: PipelineConfig, shards: Path) -> int:
    """Every frame and every sample assembled from them (the codec's `ShardFrames`, as the loader does) equals
    the store: inputs, targets at t + lead inside the split (NaN past it), scan orders, wind speed.
    Returns how many (sample, lead) targets lie past their split."""
    manifest = read_manifest(shards)
    fmt = FrameFormat.of(manifest)
    n_past = 0
    for split, period in cfg.data.splits.items():
        store = StoreSamples(cfg.data.store, period, cfg.data.leads_h, cfg.data.targets)
        seen = []
        for shard in manifest.splits[split].shards:
            raw = read_tar_frames(shards / shard.name)
            assert sorted(raw) == run_positions(shard.frames)
            inputs = set(run_positions(shard.samples))
            _frames_equal_store(raw, inputs, split, store)
            frames = ShardFrames({p: {k: memoryview(v) for k, v in m.items()} for p, m in raw.items()}, shard, split,
                                 shard.name, fmt)
            for p in run_positions(shard.samples):
                sample = frames.sample(p)
                assert sample.key == f"{split}_{p:08d}" and np.datetime64(sample.time) == store.times[p]
                np.testing.assert_array_equal(sample.input, store.fields[p])
                for name in ("scan_order", "scan_order_global", "wind_speed"):
                    np.testing.assert_array_equal(getattr(sample, name), store.per_time[name][p])
                got = np.full_like(store.targets(p), np.nan)
                for lead, target in enumerate(sample.targets):
                    if target is not None:
                        target.copy_to(got[lead])
                np.testing.assert_array_equal(got, store.targets(p))  # NaN exactly where t + lead is past the split
                n_past += sum(q is None for q in store.target_positions(p))
                seen.append(p)
        assert seen == [p for p in range(len(store.times)) if store.is_sample(p)]
    return n_past


def test_round_trip_equals_store(tiny_store: PipelineConfig, tiny_shards: Path) -> None:
    assert assert_every_sample_equals_the_store(tiny_store, tiny_shards) > 0  # every split's end runs past its data


def test_manifest_copies_the_store_record_and_statics(tiny_store: PipelineConfig, tiny_shards: Path) -> None:
    ds, record = open_features(tiny_store.data.store)
    manifest = read_manifest(tiny_shards)
    assert manifest.complete and manifest.store == record  # copied, never re-derived from the config
    assert manifest.shard_version == 2 and manifest.lead_steps == [1, 2, 4]  # leads 3, 6, 12 h of 3-h steps
    assert manifest.frame_members == {kind: list(m) for kind, m in FRAME_MEMBERS.items()}
    assert manifest.store.layout.n_tokens == 32
    np.testing.assert_array_equal(manifest.statistics.mean, ds.stats_mean.values)
    np.testing.assert_array_equal(manifest.statistics.static_std, ds.static_std.values)
    train = manifest.splits["train"]
    assert [s.count for s in train.shards] == [4] * 6  # shard.max_count = 4
    assert [s.samples for s in train.shards] == [[(4 * i, 4 * i + 4)] for i in range(6)]
    # each shard's frames: its samples plus the halo of the longest lead (4 steps), cut at the split's end (24)
    assert [s.frames for s in train.shards] == [[(4 * i, min(4 * i + 8, 24))] for i in range(6)]
    assert sorted(p.name for p in tiny_shards.glob("*.npy")) == sorted(STATIC_MEMBERS)
    for member in STATIC_MEMBERS:
        name = member.removesuffix(".npy")
        arr = np.load(tiny_shards / member, allow_pickle=False)
        np.testing.assert_array_equal(arr, ds[name].values)
        assert manifest.static[name].sha256 == sha256_file(tiny_shards / member)
    assert validate_shard_set(tiny_shards) == []
    text = summarize_shard_set(tiny_shards)
    assert "shard version 2" in text and "leads (h): [3, 6, 12] = [1, 2, 4] steps of 3 h" in text
    assert "train: 24 samples in 6 shards, 44 frames" in text and "skipped: none" in text


def test_frame_bytes_predict_every_shard_exactly(tiny_store: PipelineConfig, tiny_shards: Path) -> None:
    """The sizes the cut to shard.max_size relies on are the bytes the writer produces."""
    manifest = read_manifest(tiny_shards)
    sizes = frame_bytes(manifest.store, "train", np.datetime64("2018-01-01T00:00"))
    for record in manifest.splits.values():
        for s in record.shards:
            n_frames = len(run_positions(s.frames))
            assert s.bytes == tar_bytes(s.count * sizes.input + (n_frames - s.count) * sizes.target), s.name


def test_rerun_is_byte_identical_and_skips_good_shards(tiny_store: PipelineConfig, tiny_shards: Path,
                                                       tmp_path: Path) -> None:
    cfg = with_shards_dir(tiny_store, tmp_path / "again")
    write_shards(cfg, progress=False)
    names = sorted(p.name for p in tiny_shards.glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "again").glob("*.tar"))
    for name in names:
        assert (tiny_shards / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    with tarfile.open(tiny_shards / names[0]) as tar:  # headers carry nothing run-specific
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {
            (TAR_MTIME, 0, 0, TAR_OWNER, TAR_OWNER, 0o444)}
    # a rerun leaves good shards untouched and rewrites a damaged one (and the ones after it) identically
    shards = tmp_path / "again"
    before = {name: (shards / name).stat().st_mtime_ns for name in names}
    good = (shards / "train-000001.tar").read_bytes()
    (shards / "train-000001.tar").write_bytes(good[:1000])
    write_shards(cfg, progress=False)
    assert (shards / "train-000001.tar").read_bytes() == good
    assert (shards / "train-000000.tar").stat().st_mtime_ns == before["train-000000.tar"]
    assert (shards / "val-000000.tar").stat().st_mtime_ns == before["val-000000.tar"]
    assert validate_shard_set(shards) == []


def test_interrupted_run_resumes(tiny_store: PipelineConfig, tmp_path: Path) -> None:
    """A manifest left incomplete (a kill mid-split) is completed without rewriting finished shards."""
    cfg = with_shards_dir(tiny_store, tmp_path / "s")
    manifest_path = write_shards(cfg, progress=False)
    full = {p.name: p.read_bytes() for p in (tmp_path / "s").glob("*.tar")}
    manifest = json.loads(manifest_path.read_text())
    record = manifest["splits"]["train"]
    for shard in record["shards"][2:]:
        (tmp_path / "s" / shard["name"]).unlink()
    record["shards"], record["complete"], manifest["complete"] = record["shards"][:2], False, False
    manifest_path.write_text(json.dumps(manifest))
    kept = (tmp_path / "s" / "train-000001.tar").stat().st_mtime_ns
    assert any("incomplete" in p for p in validate_shard_set(tmp_path / "s"))
    write_shards(cfg, progress=False)
    assert (tmp_path / "s" / "train-000001.tar").stat().st_mtime_ns == kept
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").glob("*.tar")} == full
    assert read_manifest(tmp_path / "s").complete


def test_samples_with_a_missing_input_or_target_are_skipped_and_counted(tiny_store: PipelineConfig, tmp_path: Path) -> None:
    store = tmp_path / "features.zarr"
    shutil.copytree(tiny_store.data.store, store)
    valid = zarr.open_group(str(store), mode="r+")["valid"]
    valid[5] = False  # train position 5
    valid[30] = False  # val position 6 (val starts at step 24)
    cfg = with_shards_dir(tiny_store, tmp_path / "s")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"store": store})})
    write_shards(cfg, progress=False)
    manifest = read_manifest(tmp_path / "s")
    # leads 3, 6, 12 h = 1, 2, 4 steps: inputs 1, 3 and 4 reach the gap at 5 (input 6 is past it; val's 6 likewise)
    assert manifest.splits["train"].skipped == {INPUT_MISSING: ["train_00000005"],
                                                TARGET_MISSING: ["train_00000001", "train_00000003", "train_00000004"]}
    assert manifest.splits["val"].skipped == {INPUT_MISSING: ["val_00000006"],
                                              TARGET_MISSING: ["val_00000002", "val_00000004", "val_00000005"]}
    shards = manifest.splits["train"].shards
    assert sum(s.count for s in shards) == 20
    assert shards[0].samples == [(0, 1), (2, 3), (6, 8)] and shards[1].samples == [(8, 12)]
    # 1, 3 and 4 are kept as target-only frames (sample 0 reaches 1, sample 2 reaches 3 and 4); the gap 5 is no frame
    assert shards[0].frames == [(0, 5), (6, 12)]
    assert_every_sample_equals_the_store(cfg, tmp_path / "s")
    assert validate_shard_set(tmp_path / "s") == []
    assert f"1 {INPUT_MISSING}, 3 {TARGET_MISSING}" in summarize_shard_set(tmp_path / "s")


def test_max_size_limits_shard_bytes(tiny_store: PipelineConfig, tmp_path: Path) -> None:
    cfg = with_shards_dir(tiny_store, tmp_path / "s", max_count=1000, max_size=60_000)
    write_shards(cfg, progress=False)
    shards = read_manifest(tmp_path / "s").splits["train"].shards
    assert sum(s.count for s in shards) == 24 and len(shards) > 2
    assert all(s.bytes <= 60_000 for s in shards) and max(s.bytes for s in shards) > 60_000 - 10240


@settings(max_examples=200, deadline=None)
@given(valid=st.lists(st.booleans(), min_size=0, max_size=60), steps=st.lists(st.integers(1, 9), min_size=1,
       max_size=4, unique=True), max_count=st.integers(1, 12), max_size=st.integers(1, 40_000),
       sizes=st.tuples(st.integers(600, 9000), st.integers(600, 9000)))
def test_cut_shards_keeps_every_sample_once_within_the_limits(valid: list[bool], steps: list[int], max_count: int,
                                                              max_size: int, sizes: tuple[int, int]) -> None:
    """The plan: samples are exactly the valid times whose in-split targets are valid, each in one shard, in
    time order; each shard within max_count and (unless a single sample) max_size, holding its samples'
    frames and the in-split targets they need, nothing else."""
    valid_arr = np.array(valid, dtype=bool)
    n = len(valid)
    is_sample, reasons = classify(valid_arr, steps)
    want = [p for p in range(n) if valid[p] and all(valid[p + s] for s in steps if p + s < n)]
    assert np.flatnonzero(is_sample).tolist() == want
    assert (reasons[INPUT_MISSING] | reasons[TARGET_MISSING] | is_sample).all()
    assert not (reasons[INPUT_MISSING] & reasons[TARGET_MISSING]).any()
    assert not (reasons[TARGET_MISSING] & is_sample).any()
    frame_sizes = FrameBytes(input=max(sizes), target=min(sizes))
    spans = cut_shards(want, steps, n, max_count, max_size, frame_sizes)
    assert [p for span in spans for p in run_positions(span.samples)] == want
    for span in spans:
        samples = run_positions(span.samples)
        assert 1 <= len(samples) <= max_count and span.samples == to_runs(samples)
        need = {*samples, *(p + s for p in samples for s in steps if p + s < n)}
        assert run_positions(span.frames) == sorted(need) and all(valid[p] for p in need)
        size = tar_bytes(len(samples) * frame_sizes.input + (len(need) - len(samples)) * frame_sizes.target)
        assert len(samples) == 1 or size <= max_size


def _plant(shards: Path, name: str, member: str, payload: bytes) -> None:
    with tarfile.open(shards / name, "a") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("damage", ["flip", "truncate", "pickle", "static", "schema"])
def test_validate_finds_damage(tiny_shards: Path, tmp_path: Path, damage: str) -> None:
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    tar = shards / "val-000001.tar"
    if damage == "flip":
        raw = bytearray(tar.read_bytes())
        raw[2000] ^= 0xFF
        tar.write_bytes(bytes(raw))
    elif damage == "truncate":
        tar.write_bytes(tar.read_bytes()[:5000])
    elif damage == "pickle":
        _plant(shards, tar.name, "val_00000004.evil.pyd", b"\x80\x04N.")
    elif damage == "static":
        (shards / "loss_mask.npy").unlink()
    else:
        manifest = json.loads((shards / "manifest.json").read_text())
        (shards / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    problems = validate_shard_set(shards)
    expected = {"flip": "sha256", "truncate": "bytes on disk", "pickle": "sha256", "static": "loss_mask",
                "schema": "schema version 2, this code reads 3: rebuild the store"}
    assert len(problems) == 1 and expected[damage] in problems[0], problems


def test_validate_refuses_planted_member_even_with_a_matching_manifest(tiny_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    _plant(shards, "val-000001.tar", "val_00000004.evil.pyd", b"\x80\x04N.")
    rehash_shard(shards, "val-000001.tar")
    problems = validate_shard_set(shards)
    assert any("frame val_00000004 holds member(s) ['evil.pyd']" in p for p in problems), problems


def test_validate_decodes_a_sample_so_a_pickled_array_fails_naming_the_shard(tiny_shards: Path, tmp_path: Path) -> None:
    """An object-dtype input.npy (unpickling would run code) with a matching hash: inspect fails, naming it."""
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    plant_pickled_input(tiny_shards, shards, "test-000000.tar", "test_00000000")
    problems = validate_shard_set(shards)
    assert len(problems) == 1 and "test_00000000" in problems[0] and "test-000000.tar" in problems[0]
    assert "cannot be decoded safely" in problems[0]


def _as_shard_version_1(shards: Path) -> None:
    """Make a copy's manifest look like one written before frames (no shard_version, per-sample members)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for key in ("shard_version", "lead_steps", "frame_members"):
        del manifest[key]
    manifest["members"] = ["input.npy", "target.npy", "meta.json"]
    (shards / "manifest.json").write_text(json.dumps(manifest))


def test_an_older_shard_version_is_refused_naming_the_fix(tiny_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    _as_shard_version_1(shards)
    with pytest.raises(ShardSetError, match=r"shard version 1; this code reads version 2 .*re-run `python -m pipeline "
                                            r"shard --config CONFIG`"):
        read_manifest(shards)
    assert "shard version 1" in validate_shard_set(shards)[0]


def test_shard_rewrites_an_older_shard_version_and_drops_its_extra_files(tiny_store: PipelineConfig,
                                                                        tiny_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    _as_shard_version_1(shards)
    (shards / "train-000009.tar").write_bytes(b"an old shard beyond the new plan")
    write_shards(with_shards_dir(tiny_store, shards), progress=False)
    assert validate_shard_set(shards) == [] and not (shards / "train-000009.tar").exists()
    assert sorted(p.name for p in shards.glob("*.tar")) == sorted(p.name for p in tiny_shards.glob("*.tar"))


def test_cli_writes_and_summarises(tiny_store: PipelineConfig, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.yaml"
    text = Path(tiny_store.data.store).parent.joinpath("tiny.yaml").read_text()
    config.write_text(text)
    rc = pipeline_main(["shard", "--config", str(config), "--no-progress",
                        "--set", f"data.shards={tmp_path / 'cli'}", "--set", "shard.max_count=6"])
    assert rc == 0
    assert "train: 24 samples in 4 shards" in capsys.readouterr().out
    assert validate_shard_set(tmp_path / "cli") == []


def test_bad_store_errors_name_the_fix(tiny_store: PipelineConfig, tmp_path: Path) -> None:
    missing = tiny_store.model_copy(update={"data": tiny_store.data.model_copy(
        update={"store": tmp_path / "nope.zarr", "shards": tmp_path / "s"})})
    with pytest.raises(StoreError, match="does not exist.*pipeline build"):
        write_shards(missing, progress=False)
    variables = [v for v in tiny_store.data.variables if v.name != "population"]
    other = tiny_store.model_copy(update={"data": tiny_store.data.model_copy(
        update={"variables": variables, "shards": tmp_path / "s"})})
    with pytest.raises(StoreError, match=r"data.variables: only stored: population \(static, km-2\)\n.*--overwrite"):
        write_shards(other, progress=False)
    splits = dict(tiny_store.data.splits)
    splits["test"] = splits["test"].model_copy(update={"start": dt.datetime(2019, 1, 1), "end": dt.datetime(2019, 2, 1)})
    later = tiny_store.model_copy(update={"data": tiny_store.data.model_copy(
        update={"splits": splits, "shards": tmp_path / "s"})})
    with pytest.raises(StoreError, match=r"data.splits: stored"):
        write_shards(later, progress=False)
    assert not (tmp_path / "s").exists()  # nothing written before the check
