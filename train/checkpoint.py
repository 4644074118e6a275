"""Checkpoints that resume exactly and load without unpickling code.

Everything stored is a tensor or plain JSON-like data (the config as `model_dump(mode="json")`,
numpy's RNG state as an int64 tensor), so `torch.load(weights_only=True)` reads it back. Files are
written to a temporary name in the same folder and renamed, so a kill mid-write never leaves a
truncated `last.ckpt`. Which files a run keeps, and which are its best: `train.rundir`.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.safe_load import read_checkpoint
from pipeline.config import DataConfig
from pipeline.records import MODEL_FACTS, StoreRecord
from topoflow.config import changed_keys
from topoflow.errors import CheckpointError, ConfigError
from topoflow.files import atomic_write_bytes

# Settings a resumed run must share with last.ckpt: they shape the state (model.*) or the batch sequence.
SEQUENCE_KEYS = ("train.seed", "train.batch_size", "train.accumulate", "train.shuffle_buffer", "train.num_workers",
                 "train.residual", "train.freeze_backbone", "train.init_from", "train.init_variables",
                 "train.precision")


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save, written atomically (temporary name, fsync, rename; nothing left behind on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True (`model.safe_load`); a missing or unreadable file is a CheckpointError."""
    return read_checkpoint(Path(path))


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors/plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_meta": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's and Python's global generators: every stream a checkpoint saves starts from the
    run's seed, so two runs with one seed (or a run and its resumption) hold the same states."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state((kind, state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_data(ckpt: dict[str, Any], data: DataConfig, path: Path) -> None:
    """Refuse a checkpoint trained on another grid, patching, variables, targets or leads than `data`."""
    stored = ckpt.get("store_record")
    if stored is None:
        raise CheckpointError(f"{path} holds no store record: it was not written by this version of "
                              "`python -m train fit`; use it through train.init_from instead")
    why = StoreRecord.model_validate(stored).mismatch(data, MODEL_FACTS)
    if why:
        raise CheckpointError(f"{path} was trained on other data than the config describes:\n  " + "\n  ".join(why) +
                              "\nevaluate/resume with the config it was trained with, or fine-tune from it with "
                              "train.init_from (which adapts the position embedding to a new grid)")


def resume_changes(ckpt: dict[str, Any], now: dict[str, Any], world_size: int, path: Path) -> list[str]:
    """Refuse to resume with settings that change the model or the batch sequence (a ConfigError naming
    each key); return the other changed keys as lines (they apply from the resumed step on)."""
    saved = {section: ckpt["config"][section] for section in ("model", "train")}
    changes = changed_keys(saved, {section: now[section] for section in ("model", "train")})
    changes.pop("train.run_dir", None)  # a moved run directory is the same run
    fixed = [k for k in changes if k.startswith("model.") or k in SEQUENCE_KEYS]
    lines = [f"{k}: saved {changes[k][0]!r}, now {changes[k][1]!r}" for k in fixed]
    if len(ckpt["rng"]) != world_size:
        lines.append(f"processes (torchrun --nproc-per-node x nodes): saved {len(ckpt['rng'])}, now {world_size}")
    if lines:
        raise ConfigError(f"cannot resume {path} exactly with these settings:\n  " + "\n  ".join(lines) +
                          "\nresume with the saved values, or start a new run (--set train.run_dir=NEW_DIR)")
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items() if k not in fixed]
