"""Faults a cluster injects into build and shard: SIGKILL at any write, a second concurrent run, a full
or read-only disk. Each one resumes to the same bytes or stops with an error naming the output and the fix."""

from __future__ import annotations

import copy
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.build import build_features
from pipeline.config import load_pipeline_config
from pipeline.shard import write_shards
from pipeline.shardset import read_manifest
from pipeline.store import partial_path
from tests.helpers import tiny_raw_config, write_config, write_synthetic_source
from tests.kill import assert_same_tree, run_killed
from topoflow.errors import OutputError
from topoflow.lock import exclusive

pytestmark = pytest.mark.slow
KILL_SEEDS = [0, 1, 2]


def _config(raw: dict, where: Path, **data: str) -> Path:
    """The shared tiny recipe writing into `where` (the source file stays shared, so provenance is equal)."""
    raw = copy.deepcopy(raw)
    raw["data"].update({"store": str(where / "features.zarr"), "shards": str(where / "shards"), **data})
    raw["build"]["time_chunk"] = 16  # 3 blocks
    where.mkdir(parents=True, exist_ok=True)
    return write_config(raw, where / "tiny.yaml")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted build and shard run under the kill harness: the expected bytes and the number of
    file-system writes each makes (the range the kill moments are drawn from)."""
    root = tmp_path_factory.mktemp("faults")
    raw = tiny_raw_config(root)
    write_synthetic_source(load_pipeline_config(write_config(raw, root / "source.yaml")))
    config = _config(raw, root / "ref")
    _, build_writes = run_killed(["pipeline", "build", "--config", str(config), "--no-progress",
                                  "--set", "build.processes=false"], root, kill_at=0)
    _, shard_writes = run_killed(["pipeline", "shard", "--config", str(config), "--no-progress"], root, kill_at=0)
    assert build_writes > 20 and shard_writes > 10
    return {"raw": raw, "dir": root / "ref", "build_writes": build_writes, "shard_writes": shard_writes}


def _moment(seed: int, writes: int) -> int:
    return int(np.random.default_rng(seed).integers(1, int(0.95 * writes)))  # a killed run may write a little less


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_build_killed_at_a_random_write_resumes_to_the_same_bytes(reference: dict, tmp_path: Path, seed: int) -> None:
    config = _config(reference["raw"], tmp_path / "run")
    code, _ = run_killed(["pipeline", "build", "--config", str(config), "--no-progress", "--set",
                          "build.processes=false"], tmp_path, kill_at=_moment(seed, reference["build_writes"]))
    assert code == -9
    build_features(load_pipeline_config(config), progress=False)  # the rerun resumes (or starts) the build
    assert_same_tree(reference["dir"] / "features.zarr", tmp_path / "run" / "features.zarr")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".features.zarr.lock", "features.zarr", "tiny.yaml"]


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_shard_killed_at_a_random_write_resumes_to_the_same_bytes(reference: dict, tmp_path: Path, seed: int) -> None:
    config = _config(reference["raw"], tmp_path, store=str(reference["dir"] / "features.zarr"))
    code, _ = run_killed(["pipeline", "shard", "--config", str(config), "--no-progress"], tmp_path,
                         kill_at=_moment(seed, reference["shard_writes"]))
    assert code == -9
    write_shards(load_pipeline_config(config), progress=False)
    assert_same_tree(reference["dir"] / "shards", tmp_path / "shards")


def test_a_second_build_or_shard_run_is_refused_while_one_holds_the_lock(reference: dict, tmp_path: Path) -> None:
    cfg = load_pipeline_config(_config(reference["raw"], tmp_path, store=str(reference["dir"] / "features.zarr")))
    with exclusive(cfg.data.store, "feature store"):
        with pytest.raises(OutputError, match=r"feature store .*features.zarr is being written by host .* pid \d+"):
            build_features(cfg, progress=False)
    with exclusive(cfg.data.shards, "shard set"):
        with pytest.raises(OutputError, match=r"shard set .*shards is being written by .*wait for that run"):
            write_shards(cfg, progress=False)
    write_shards(cfg, progress=False)  # released: the same call goes through


def test_full_disk_during_build_names_the_store_not_the_source(reference: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_pipeline_config(_config(reference["raw"], tmp_path))
    cfg.build.processes = False  # block tasks in this process, where the disk is "full"

    real_setitem = zarr.Array.__setitem__

    def full(self: zarr.Array, *args: object) -> None:  # the template fits; the first block's fields do not
        if self.path == "fields":
            raise OSError(errno.ENOSPC, "No space left on device", str(partial_path(cfg.data.store) / "fields"))
        real_setitem(self, *args)

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(OutputError, match=r"cannot write .*features.zarr.partial .*the disk is full: free space, "
                                          r"then rerun build \(finished blocks are kept\)") as info:
        build_features(cfg, progress=False)
    assert "source" not in str(info.value) and "corrupt" not in str(info.value)


@pytest.mark.parametrize("stage", ["build", "shard"])
def test_read_only_output_is_an_error_naming_the_directory(reference: dict, tmp_path: Path, stage: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    read_only = tmp_path / "ro"  # as on a read-only mount: nothing can be created under it
    store = read_only / "features.zarr" if stage == "build" else reference["dir"] / "features.zarr"
    cfg = load_pipeline_config(_config(reference["raw"], read_only, store=str(store)))

    def refuse(fn):  # noqa: ANN001, ANN202
        def call(path, *args, **kwargs):  # noqa: ANN001, ANN202
            if str(path).startswith(str(read_only)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return fn(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
    monkeypatch.setattr(os, "open", refuse(os.open))
    with pytest.raises(OutputError, match=r"cannot write .*/ro.*: the file system is read-only: choose a writable "
                                          r"directory"):
        build_features(cfg, progress=False) if stage == "build" else write_shards(cfg, progress=False)


def test_a_failed_shard_run_leaves_no_temporary_tar_and_resumes(reference: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_pipeline_config(_config(reference["raw"], tmp_path, store=str(reference["dir"] / "features.zarr")))
    import webdataset as wds

    real_write, calls = wds.TarWriter.write, {"n": 0}

    def fills_up(self: wds.TarWriter, obj: dict) -> int:
        calls["n"] += 1
        if calls["n"] == 15:  # a frame of the second train shard (the first holds 8 samples + a 4-step halo)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", fills_up)
    assert cfg.shard.max_count == 8
    with pytest.raises(OutputError, match="disk is full.*then rerun shard \\(finished shards are kept\\)"):
        write_shards(cfg, progress=False)
    root = Path(cfg.data.shards)
    assert not list(root.glob("*.tmp")) and not read_manifest(root).complete
    assert [s.name for s in read_manifest(root).splits["train"].shards] == ["train-000000.tar"]
    monkeypatch.setattr(wds.TarWriter, "write", real_write)
    write_shards(cfg, progress=False)
    assert_same_tree(reference["dir"] / "shards", root)
