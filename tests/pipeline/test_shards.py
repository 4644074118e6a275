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

from pipeline.__main__ import main as pipeline_main
from pipeline.codec import SAMPLE_MEMBERS, STATIC_MEMBERS
from pipeline.config import PipelineConfig
from pipeline.shard import INPUT_MISSING, TAR_MTIME, TAR_OWNER, TARGET_MISSING, write_shards
from pipeline.shardset import read_manifest, summarize_shard_set, validate_shard_set
from pipeline.store import open_features
from tests.helpers import plant_pickled_input, rehash_shard
from topoflow.errors import StoreError
from topoflow.files import sha256_file


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> member -> bytes, straight from the tar (independent of webdataset)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, member = info.name.split(".", 1)
            samples.setdefault(key, {})[member] = tar.extractfile(info).read()
    return samples


def npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def with_shards_dir(cfg: PipelineConfig, path: Path, **shard: int) -> PipelineConfig:
    data = cfg.data.model_copy(update={"shards": path})
    return cfg.model_copy(update={"data": data, "shard": cfg.shard.model_copy(update=shard)})


def test_round_trip_equals_store(tiny_store: PipelineConfig, tiny_shards: Path) -> None:
    """Every sample equals the store: inputs, targets at t+lead inside the split (NaN past it), orders."""
    ds, record = open_features(tiny_store.data.store)
    data = tiny_store.data
    manifest = read_manifest(tiny_shards)
    tvars = record.target_index
    fields = ds.fields.values
    times = ds.time.values
    n_nan_targets = 0
    for split, period in data.splits.items():
        in_split = np.nonzero((times >= np.datetime64(period.start)) & (times <= np.datetime64(period.end)))[0]
        position_of = {times[i]: p for p, i in enumerate(in_split)}
        seen = []
        for shard in manifest.splits[split].shards:
            samples = read_tar(tiny_shards / shard.name)
            assert len(samples) == shard.count
            for key, members in samples.items():
                assert "." not in key and key.startswith(f"{split}_")
                assert set(members) == set(SAMPLE_MEMBERS)
                p = int(key.split("_")[1])
                t = in_split[p]
                np.testing.assert_array_equal(npy(members["input.npy"]), fields[t])  # dynamic channels only
                target = npy(members["target.npy"])
                assert target.shape == (len(data.leads_h), len(tvars), *fields.shape[2:])
                for lead, hours in enumerate(data.leads_h):
                    q = position_of.get(times[t] + np.timedelta64(hours, "h"))
                    if q is None:
                        assert np.isnan(target[lead]).all()
                        n_nan_targets += 1
                    else:
                        np.testing.assert_array_equal(target[lead], fields[in_split[q]][tvars])
                for name in ("scan_order", "scan_order_global", "wind_speed"):
                    arr = npy(members[f"{name}.npy"])
                    np.testing.assert_array_equal(arr, ds[name].values[t])
                    assert arr.dtype == ds[name].dtype
                meta = json.loads(members["meta.json"])
                assert np.datetime64(meta["time"]) == times[t] and meta["leads_h"] == data.leads_h
                seen.append(p)
        assert sorted(seen) == list(range(len(in_split)))  # nothing skipped: the tiny source has no gap
    assert n_nan_targets > 0  # the end of every split runs past its data


def test_manifest_copies_the_store_record_and_statics(tiny_store: PipelineConfig, tiny_shards: Path) -> None:
    ds, record = open_features(tiny_store.data.store)
    manifest = read_manifest(tiny_shards)
    assert manifest.complete and manifest.store == record  # copied, never re-derived from the config
    assert manifest.store.layout.n_tokens == 32 and manifest.members == list(SAMPLE_MEMBERS)
    np.testing.assert_array_equal(manifest.statistics.mean, ds.stats_mean.values)
    np.testing.assert_array_equal(manifest.statistics.static_std, ds.static_std.values)
    train = manifest.splits["train"]
    assert [s.count for s in train.shards] == [4] * 6  # shard.max_count = 4
    assert [(s.start, s.stop) for s in train.shards] == [(4 * i, 4 * i + 4) for i in range(6)]
    assert sorted(p.name for p in tiny_shards.glob("*.npy")) == sorted(STATIC_MEMBERS)
    for member in STATIC_MEMBERS:
        name = member.removesuffix(".npy")
        arr = np.load(tiny_shards / member, allow_pickle=False)
        np.testing.assert_array_equal(arr, ds[name].values)
        assert manifest.static[name].sha256 == sha256_file(tiny_shards / member)
    assert validate_shard_set(tiny_shards) == []
    text = summarize_shard_set(tiny_shards)
    assert "train: 24 samples in 6 shards" in text and "skipped: none" in text


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
    keys = [k for s in manifest.splits["train"].shards for k in read_tar(tmp_path / "s" / s.name)]
    assert len(keys) == 20 and "train_00000005" not in keys and "train_00000004" not in keys
    assert validate_shard_set(tmp_path / "s") == []
    assert f"1 {INPUT_MISSING}, 3 {TARGET_MISSING}" in summarize_shard_set(tmp_path / "s")


def test_max_size_limits_shard_bytes(tiny_store: PipelineConfig, tmp_path: Path) -> None:
    cfg = with_shards_dir(tiny_store, tmp_path / "s", max_count=1000, max_size=3 * 30_000)
    write_shards(cfg, progress=False)
    counts = [s.count for s in read_manifest(tmp_path / "s").splits["train"].shards]
    assert sum(counts) == 24 and max(counts) < 24 and len(counts) > 2


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
    assert any("lack or add members" in p for p in problems), problems


def test_validate_decodes_a_sample_so_a_pickled_array_fails_naming_the_shard(tiny_shards: Path, tmp_path: Path) -> None:
    """An object-dtype input.npy (unpickling would run code) with a matching hash: inspect fails, naming it."""
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    plant_pickled_input(tiny_shards, shards, "test-000000.tar", "test_00000000")
    problems = validate_shard_set(shards)
    assert len(problems) == 1 and "test_00000000" in problems[0] and "test-000000.tar" in problems[0]
    assert "cannot be decoded safely" in problems[0]


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
