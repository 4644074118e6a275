"""Faults that used to falsify training and evaluation silently: a kill at any moment with loader
workers, a used run directory, changed settings on resume, incomplete or damaged shard sets, a full
disk, a concurrent fit, a SIGKILL'd torchrun. Each resumes exactly or stops with an error naming the fix."""

from __future__ import annotations

import copy
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.shardset import read_manifest, write_manifest
from tests.helpers import REPO, plant_pickled_input, write_config
from tests.kill import alive, children, kill_all, run_killed
from topoflow.errors import CheckpointError, ConfigError, OutputError, ShardSetError
from topoflow.lock import exclusive
from train.__main__ import main
from train.checkpoint import load_checkpoint, save_atomic
from train.config import load_experiment_config
from train.evaluate import evaluate
from train.fit import fit
from train.loader.stages import CorruptShardError
from train.rundir import read_run

pytestmark = pytest.mark.slow
KILL_SEEDS = [0, 1, 2]
STATE = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "loader", "rng", "best_val_loss", "val_loss")


def _experiment(raw: dict, run_dir: Path, **train: object) -> Path:
    raw = copy.deepcopy(raw)
    raw["train"].update({"run_dir": str(run_dir), **train})
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return write_config(raw, run_dir.parent / f"{run_dir.name}.yaml")


@pytest.fixture(scope="module")
def kill_reference(tiny_store, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted fit with 2 loader workers, drop-path and best-k under the kill harness."""
    raw = tiny_store.model_dump(mode="json")
    raw["model"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "chunk_size": 16, "drop_path": 0.2}
    raw["train"] = {"max_steps": 8, "batch_size": 2, "eval_batch_size": 4, "num_workers": 2, "warmup_steps": 1,
                    "val_every": 2, "checkpoint_every": 3, "log_every": 1, "save_top_k": 2, "lr": 1e-3}
    root = tmp_path_factory.mktemp("fit_faults")
    config = _experiment(raw, root / "ref")
    _, writes = run_killed(["train", "fit", "--config", str(config), "--no-progress"], root, kill_at=0)
    assert writes > 20
    return {"raw": raw, "run": root / "ref", "writes": writes}


def _scalars(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "train_samples_per_s"} for row in csv.DictReader(fh)]


def _same(a: object, b: object) -> bool:
    """Bitwise equality of nested checkpoint data (tensors, dicts, lists, plain values; NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8),
                                                                                    b.view(-1).view(torch.uint8))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def assert_same_run(a: Path, b: Path) -> None:
    """Same final state (bitwise), the same best-k list and the same logged scalars (timings aside)."""
    ca, cb = load_checkpoint(a / "last.ckpt"), load_checkpoint(b / "last.ckpt")
    for key in STATE:
        assert _same(ca[key], cb[key]), key
    best = lambda run: [(e.file, e.val_loss, e.step) for e in read_run(run).best]  # noqa: E731
    assert best(a) == best(b) and sorted(p.name for p in b.glob("best-*")) == sorted(f for f, _, _ in best(b))
    assert _scalars(a) == _scalars(b)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_fit_killed_at_a_random_write_resumes_bit_identically(kill_reference: dict, tmp_path: Path, seed: int) -> None:
    config = _experiment(kill_reference["raw"], tmp_path / "run")
    args = ["train", "fit", "--config", str(config), "--no-progress"]
    moment = int(np.random.default_rng(seed).integers(1, int(0.95 * kill_reference["writes"])))
    code, _ = run_killed(args, tmp_path, kill_at=moment)
    assert code == -9
    code, _ = run_killed([*args, "--resume"], tmp_path, kill_at=0)  # the requeued job's command line
    assert code == 0
    assert_same_run(kill_reference["run"], tmp_path / "run")


def test_a_fresh_fit_refuses_a_used_run_dir_and_resume_takes_it(tiny_experiment: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    config = write_config(tiny_experiment, tmp_path / "c.yaml")
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    first = read_run(tmp_path / "run").run_id
    assert main(["fit", "--config", str(config), "--no-progress", "--set", "model.embed_dim=64"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "train.run_dir" in err
    assert read_run(tmp_path / "run").run_id == first  # nothing of the old run was touched
    assert main(["fit", "--config", str(config), "--no-progress", "--resume"]) == 0  # finished: returns at once
    assert read_run(tmp_path / "run").run_id == first


def test_resume_refuses_settings_that_change_the_batches_and_names_them(tiny_experiment: dict, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_experiment_config(write_config(tiny_experiment, tmp_path / "c.yaml"))
    fit(cfg, progress=False)
    for override, key in (("train.batch_size=4", "train.batch_size: saved 2, now 4"),
                          ("model.embed_dim=64", "model.embed_dim: saved 32, now 64"),
                          ("train.seed=3", "train.seed: saved 0, now 3")):
        changed = load_experiment_config(tmp_path / "c.yaml", [override])
        with pytest.raises(ConfigError, match=rf"(?s)cannot resume .*last.ckpt.*{key}.*train.run_dir=NEW_DIR"):
            fit(changed, resume=True, progress=False)
    longer = load_experiment_config(tmp_path / "c.yaml", ["train.max_steps=6", "train.lr=5e-4"])
    assert fit(longer, resume=True, progress=False).step == 6  # other settings apply from the resumed step on
    assert "train.lr: 0.001 -> 0.0005" in caplog.text and "train.max_steps: 4 -> 6" in caplog.text


def test_a_checkpoint_with_other_trainable_parameters_is_refused_with_the_fix(tiny_experiment: dict,
                                                                             tmp_path: Path) -> None:
    """A last.ckpt from a version that trained fewer tensors (pos_embed used to be frozen) cannot resume."""
    cfg = load_experiment_config(write_config(tiny_experiment, tmp_path / "c.yaml"))
    fit(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    ckpt["optimizer"]["param_groups"][0]["params"] = ckpt["optimizer"]["param_groups"][0]["params"][1:]
    save_atomic(ckpt, tmp_path / "run" / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"(?s)other trainable parameters.*train.run_dir=NEW_DIR"):
        fit(cfg, resume=True, progress=False)


@pytest.mark.parametrize("command", ["fit", "evaluate"])
def test_an_incomplete_shard_set_is_refused_with_the_fix(tiny_experiment: dict, tiny_shards: Path, tmp_path: Path,
                                                         command: str) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = read_manifest(shards)
    manifest.complete, manifest.splits["val"].complete = False, False  # as a shard run killed in the val split
    write_manifest(shards, manifest)
    raw = copy.deepcopy(tiny_experiment)
    raw["data"]["shards"] = str(shards)
    cfg = load_experiment_config(write_config(raw, tmp_path / "c.yaml"))
    with pytest.raises(ShardSetError, match=r"incomplete .*unfinished split\(s\): \['val'\].*pipeline shard"):
        fit(cfg, progress=False) if command == "fit" else evaluate(cfg, progress=False)


def test_evaluate_records_a_skipped_shard_and_obeys_strict_data(tiny_experiment: dict, tiny_shards: Path,
                                                                tmp_path: Path) -> None:
    cfg = load_experiment_config(write_config(tiny_experiment, tmp_path / "c.yaml"))
    fit(cfg, progress=False)
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    test_shards = read_manifest(shards).splits["test"].shards
    damaged = shards / test_shards[1].name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated in a copy
    raw = copy.deepcopy(tiny_experiment)
    raw["data"]["shards"] = str(shards)
    lenient = load_experiment_config(write_config(raw, tmp_path / "d.yaml"))
    report = evaluate(lenient, progress=False)
    data = json.loads((report.parent / "metrics.json").read_text())["data"]
    total = sum(s.count for s in test_shards)
    assert data["samples"] == total and data["evaluated"] == total - test_shards[1].count
    assert data["skipped_shards"] == [damaged.name]
    assert f"**{data['evaluated']} of {total} evaluated: corrupt shard(s) {damaged.name}" in report.read_text()
    strict = load_experiment_config(tmp_path / "d.yaml", ["train.strict_data=true"])
    with pytest.raises(CorruptShardError, match=damaged.name):
        evaluate(strict, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pickled_input_stops_fit_with_an_error_naming_the_shard(tiny_experiment: dict, tiny_shards: Path,
                                                                  tmp_path: Path, workers: int,
                                                                  capsys: pytest.CaptureFixture) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    name = read_manifest(shards).splits["train"].shards[0].name
    plant_pickled_input(tiny_shards, shards, name, f"train_{0:08d}")
    raw = copy.deepcopy(tiny_experiment)
    raw["data"]["shards"] = str(shards)
    raw["train"].update({"num_workers": workers, "max_steps": 12})
    assert main(["fit", "--config", str(write_config(raw, tmp_path / "c.yaml")), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"train_00000000 ({shards / name})" in err and "cannot be decoded safely" in err


def test_a_second_fit_into_a_run_dir_in_use_is_refused(tiny_experiment: dict, tmp_path: Path) -> None:
    cfg = load_experiment_config(write_config(tiny_experiment, tmp_path / "c.yaml"))
    with exclusive(cfg.train.run_dir, "run directory"):
        with pytest.raises(OutputError, match=r"run directory .*run is being written by host"):
            fit(cfg, progress=False)
    assert not (cfg.train.run_dir / "run.json").exists()


def test_a_checkpoint_write_on_a_full_disk_names_it_and_leaves_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*last.ckpt: the disk is full: free space, then rerun"):
        save_atomic({"w": torch.ones(3)}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def _lock_free(run_dir: Path) -> bool:
    try:
        with exclusive(run_dir, "run directory"):
            return True
    except OutputError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ranks die with torchrun through Linux prctl")
def test_ranks_die_with_a_sigkilled_torchrun_and_release_the_run_dir(tiny_experiment: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(tiny_experiment)
    raw["train"].update({"max_steps": 100000, "checkpoint_every": 1, "val_every": 0})
    config = write_config(raw, tmp_path / "c.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                                 "-m", "train", "fit", "--config", str(config), "--no-progress"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "last.ckpt").exists():  # training is under way
            assert time.monotonic() < deadline and launcher.poll() is None, "torchrun did not start training"
            time.sleep(0.2)
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while (any(alive(pid) for pid in ranks) or not _lock_free(tmp_path / "run")) and time.monotonic() < deadline:
            time.sleep(0.2)  # a zombie leader's other threads may still be tearing down, holding its files
        assert not any(alive(pid) for pid in ranks), "ranks kept training after their launcher died"
        assert _lock_free(tmp_path / "run"), "the run_dir lock outlived the ranks"
    finally:
        kill_all([launcher.pid, *ranks])


def test_a_read_only_run_dir_is_an_error_naming_it(tiny_experiment: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_experiment_config(write_config(tiny_experiment, tmp_path / "c.yaml"))
    real_mkdir = os.mkdir

    def read_only(path: object, *args: object, **kwargs: object) -> None:
        if str(path).startswith(str(cfg.train.run_dir)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(OutputError, match=r"cannot write .*/run: the file system is read-only: choose a writable"):
        fit(cfg, progress=False)
