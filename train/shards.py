"""A shard set as the trainer sees it: the manifest record, the static arrays beside it, and the
numbers derived from them, loaded once per process (`load_shard_set`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.codec import FrameFormat
from pipeline.records import ManifestRecord, StoreRecord
from pipeline.shardset import manifest_path, read_manifest
from topoflow.errors import ShardSetError
from topoflow.files import sha256_file
from topoflow.layout import PatchLayout


@dataclass(frozen=True)
class ShardSet:
    """Manifest + static arrays of one shard set (physical units)."""

    root: Path
    manifest: ManifestRecord
    static: np.ndarray  # (S, H, W) static input channels
    loss_mask: np.ndarray  # (H, W) bool
    patch_elevation: np.ndarray  # (L,) m
    lat: np.ndarray
    lon: np.ndarray

    @property
    def record(self) -> StoreRecord:
        return self.manifest.store

    @property
    def layout(self) -> PatchLayout:
        return self.record.layout

    @property
    def variables(self) -> list[str]:
        """Every model input channel, in the model's order."""
        return self.record.variable_names

    @property
    def targets(self) -> list[str]:
        return self.record.targets

    @property
    def leads_h(self) -> list[int]:
        return self.record.leads_h

    @functools.cached_property
    def stats_mean(self) -> np.ndarray:
        """float64 (V_dynamic,) train-period means."""
        return np.asarray(self.manifest.statistics.mean, dtype=np.float64)

    @functools.cached_property
    def input_std(self) -> np.ndarray:
        """float64 (V_dynamic,) stds, zeros replaced by 1 so a constant variable normalises to 0, not inf."""
        std = np.asarray(self.manifest.statistics.std, dtype=np.float64)
        return np.where(std > 0, std, 1.0)

    @functools.cached_property
    def change_std(self) -> np.ndarray:
        """(n_leads, P) spread of each target's change over each lead; NaN where unknown."""
        rows = self.record.change_std or [[None] * len(self.targets) for _ in self.leads_h]
        return np.array(rows, dtype=np.float64)  # JSON null -> NaN

    @functools.cached_property
    def frame_format(self) -> FrameFormat:
        """How samples are assembled from this set's frames (lead steps and members, from the manifest)."""
        return FrameFormat.of(self.manifest)

    @property
    def target_index(self) -> list[int]:
        """Position of each target among the dynamic input channels."""
        return self.record.target_index

    @property
    def target_mean(self) -> np.ndarray:
        """float32 (P,) statistics of the targets, for denormalising predictions."""
        return self.stats_mean[self.target_index].astype(np.float32)

    @property
    def target_std(self) -> np.ndarray:
        return self.input_std[self.target_index].astype(np.float32)

    def shards(self, split: str) -> list:
        if split not in self.manifest.splits:
            raise ShardSetError(f"split {split!r} is not in {self.root} (it has {sorted(self.manifest.splits)})")
        return self.manifest.splits[split].shards


@functools.lru_cache(maxsize=8)
def _load(root: str, manifest_mtime_ns: int) -> ShardSet:
    manifest = read_manifest(root)
    if not manifest.complete:
        unfinished = [split for split, record in manifest.splits.items() if not record.complete]
        raise ShardSetError(f"shard set {root} is incomplete (writing was interrupted; unfinished split(s): "
                            f"{unfinished or 'none, the manifest was not closed'}): training or evaluating on it would "
                            "silently use part of the data. Finish it with `python -m pipeline shard --config CONFIG` "
                            "(it keeps the shards already written)")
    arrays = {}
    for name, entry in manifest.static.items():
        path = Path(root) / entry.file
        if not path.is_file() or sha256_file(path) != entry.sha256:
            raise ShardSetError(f"static array {path} is missing or differs from the manifest: "
                                "rerun `python -m pipeline shard --config CONFIG`")
        arrays[name] = np.load(path, allow_pickle=False)
    return ShardSet(root=Path(root), manifest=manifest, static=arrays["static"], loss_mask=arrays["loss_mask"],
                    patch_elevation=arrays["patch_elevation"], lat=arrays["lat"], lon=arrays["lon"])


def load_shard_set(shards_dir: str | Path) -> ShardSet:
    """The complete shard set at `shards_dir`, cached per process (keyed by path and manifest mtime, so a
    rewritten shard set is reloaded); an incomplete one is a ShardSetError saying how to finish it."""
    path = manifest_path(shards_dir).resolve()
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        mtime = -1  # read_manifest raises the error with the fix
    return _load(str(path.parent), mtime)
