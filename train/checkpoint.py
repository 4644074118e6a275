"""Checkpoints that resume exactly and load without unpickling code.

Everything stored is a tensor or plain JSON-like data (the config as `model_dump(mode="json")`,
numpy's RNG state as an int64 tensor), so `torch.load(weights_only=True)` reads it back. Files are
written to a temporary name in the same folder and renamed, so a kill mid-write never leaves a
truncated `last.ckpt`. Best-k files are named `best-val_loss=0.3557-step=311.ckpt`.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.records import MODEL_FACTS, StoreRecord
from topoflow.errors import CheckpointError
from topoflow.files import atomic_write_bytes

LAST = "last.ckpt"
_BEST_RE = re.compile(r"^best-val_loss=(?P<loss>[0-9.]+|nan|inf)-step=(?P<step>\d+)\.ckpt$")


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save, written atomically (temporary name, fsync, rename; nothing left behind on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; a missing or unreadable file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (train.run_dir holds last.ckpt and best-*.ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({type(exc).__name__}: {exc}); it is truncated, corrupt "
            "or holds pickled objects: use another checkpoint"
        ) from None


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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state((kind, state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def best_checkpoints(run_dir: Path) -> list[tuple[float, int, Path]]:
    """(val loss, step, path) of the best-k files in run_dir, lowest loss first."""
    found = []
    for path in Path(run_dir).glob("best-*.ckpt"):
        match = _BEST_RE.match(path.name)
        if match:
            found.append((float(match["loss"]), int(match["step"]), path))
    return sorted(found)


def best_name(val_loss: float, step: int) -> str:
    return f"best-val_loss={val_loss:.4f}-step={step}.ckpt"


def update_best(run_dir: Path, payload: dict[str, Any], val_loss: float, step: int, top_k: int) -> Path | None:
    """Save `payload` as a best checkpoint if it ranks in the top k, deleting the ones pushed out."""
    if top_k <= 0 or not np.isfinite(val_loss):
        return None
    current = best_checkpoints(run_dir)
    if len(current) >= top_k and val_loss >= current[top_k - 1][0]:
        return None
    path = Path(run_dir) / best_name(val_loss, step)
    save_atomic(payload, path)
    for _, _, old in best_checkpoints(run_dir)[top_k:]:
        old.unlink(missing_ok=True)
    return path


def default_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint in run_dir (lowest val loss), else last.ckpt; a CheckpointError if neither exists."""
    best = best_checkpoints(run_dir)
    if best:
        return best[0][2]
    last = Path(run_dir) / LAST
    if last.is_file():
        return last
    raise CheckpointError(
        f"no checkpoint in {run_dir}: run `python -m train fit --config CONFIG` first or pass --checkpoint PATH"
    )


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
