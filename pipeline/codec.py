"""The shard frame format: which members a frame holds, how they are encoded and decoded, and how a
sample is assembled from the frames of one shard.

Writer (`pipeline.shard`), loader (`train.loader`) and `inspect` share this module, so a frame and a
sample are defined once. Everything is `.npy` (decoded with allow_pickle=False) or `.json`: nothing is
ever unpickled, and any other member is refused.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds

from pipeline.features import STATIC_OUTPUTS, TIME_OUTPUTS
from pipeline.records import ManifestRecord, ShardSpan, StoreRecord, run_positions
from topoflow.errors import ShardSetError

INPUT_MEMBERS = (*(o.member for o in TIME_OUTPUTS if o.member), "meta.json")  # a sample's input time
TARGET_MEMBERS = ("target.npy", "meta.json")  # a time only targets need: the P target fields
FRAME_MEMBERS = {"input": INPUT_MEMBERS, "target": TARGET_MEMBERS}
STATIC_MEMBERS = (*(o.member for o in STATIC_OUTPUTS if o.member), "lat.npy", "lon.npy")
ENCODERS = {  # explicit, so nothing can ever be pickled into a shard
    "npy": wds.writer.numpy_dumps,
    "json": lambda obj: json.dumps(obj, sort_keys=True).encode("utf-8"),
}
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], str, int]] = {}
_FIX = "rewrite the shard set with `python -m pipeline shard --config CONFIG`"


def frame_key(split: str, position: int) -> str:
    """`{split}_{position:08d}`, position = the frame's time step in its split (skipped ones count too).

    No dots, because webdataset splits member names at the first dot.
    """
    return f"{split}_{position:08d}"


def encode(frame: dict[str, Any]) -> dict[str, Any]:
    """A frame's members as the bytes the tar holds (what webdataset's writer does with ENCODERS)."""
    return wds.writer.encode_based_on_extension(frame, ENCODERS)


def member_shapes(record: StoreRecord) -> dict[str, tuple[int, ...]]:
    """Shape of each .npy frame member implied by the store's record."""
    h, w = record.layout.grid
    n_tok = record.layout.n_tokens
    return {"input.npy": (len(record.names("dynamic")), h, w), "target.npy": (len(record.targets), h, w),
            "scan_order.npy": (n_tok,), "scan_order_global.npy": (n_tok,), "wind_speed.npy": (n_tok,)}


@dataclass(frozen=True)
class FrameFormat:
    """What assembling samples from frames needs, read from the manifest (never re-derived)."""

    shapes: dict[str, tuple[int, ...]]
    target_index: tuple[int, ...]
    lead_steps: tuple[int, ...]

    @classmethod
    def of(cls, manifest: ManifestRecord) -> "FrameFormat":
        return cls(member_shapes(manifest.store), tuple(manifest.store.target_index), tuple(manifest.lead_steps))


def decode_npy(raw: bytes | memoryview) -> np.ndarray:
    """Decode .npy bytes (never pickle) as a read-only view (of the shard's bytes, when given a memoryview).

    A member has the same header (dtype, shape) in every frame, so each distinct header is parsed
    once by np.load(allow_pickle=False), which refuses object dtypes; numpy evaluates headers with
    `ast`, and that alone cost more than the tar reading (benchmarks/loader.py).
    """
    if len(raw) < 12 or raw[:6] != b"\x93NUMPY" or raw[6] not in (1, 2, 3):
        return np.load(io.BytesIO(raw), allow_pickle=False)  # raises numpy's own error
    length_end = 10 if raw[6] == 1 else 12
    offset = length_end + int.from_bytes(raw[8:length_end], "little")
    header = bytes(raw[:offset])  # a copy: a view as the key would keep the whole shard alive
    meta = _NPY_HEADERS.get(header)
    if meta is None:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        _NPY_HEADERS[header] = (arr.dtype, arr.shape, order, arr.size)
        return arr
    dtype, shape, order, count = meta
    return np.frombuffer(raw, dtype=dtype, offset=offset, count=count).reshape(shape, order=order)


@dataclass(frozen=True)
class TargetFields:
    """The targets at one t + lead, as a view of the frame that holds them: an input frame's fields
    (channels = the targets' positions among them) or a target-only frame's (channels 0..P-1).
    Copied once, straight into the batch (`copy_to`)."""

    fields: np.ndarray
    channels: tuple[int, ...]

    def copy_to(self, out: np.ndarray) -> None:
        np.take(self.fields, self.channels, axis=0, out=out, mode="clip")  # "raise" would copy via a buffer

    def learnable(self, mask: np.ndarray) -> bool:
        """Whether any target cell is finite where the loss mask counts it."""
        return any((np.isfinite(self.fields[c]) & mask).any() for c in self.channels)


@dataclass(frozen=True)
class Sample:
    """One sample (input time t) assembled from a shard's frames; `targets` per lead, None where
    t + lead is past the split's end (NaN in the batch)."""

    key: str
    time: str
    input: np.ndarray  # (V_dynamic, H, W) float32, physical units
    scan_order: np.ndarray
    scan_order_global: np.ndarray
    wind_speed: np.ndarray
    targets: tuple[TargetFields | None, ...]


class ShardFrames:
    """The frames of one shard as read (member name -> bytes, by split position), and the samples they
    make. Decoding is lazy and zero-copy: a sample skipped on resume is never decoded."""

    def __init__(self, frames: Mapping[int, Mapping[str, Any]], span: ShardSpan, split: str, where: str,
                 fmt: FrameFormat) -> None:
        self.frames, self.span, self.split, self.where, self.fmt = frames, span, split, where, fmt
        self.inputs = frozenset(run_positions(span.samples))

    def sample(self, position: int) -> Sample:
        """The sample at split position `position` (one of the shard's samples)."""
        x = self.decode(position)
        return Sample(key=frame_key(self.split, position), time=x["meta.json"]["time"], input=x["input.npy"],
                      scan_order=x["scan_order.npy"], scan_order_global=x["scan_order_global.npy"],
                      wind_speed=x["wind_speed.npy"],
                      targets=tuple(self._target(position + s) for s in self.fmt.lead_steps))

    def _target(self, position: int) -> TargetFields | None:
        """The targets held by frame `position`: only its fields member is decoded."""
        if position not in self.frames:  # past the split's end (the writer holds every target inside it)
            return None
        if position in self.inputs:
            return TargetFields(self._member(position, "input.npy"), self.fmt.target_index)
        fields = self._member(position, "target.npy")
        return TargetFields(fields, tuple(range(len(fields))))

    def decode(self, position: int) -> dict[str, Any]:
        """Decode one frame whole; a foreign member, a pickled array or a wrong shape is a ShardSetError naming
        the frame and its shard."""
        allowed = FRAME_MEMBERS["input" if position in self.inputs else "target"]
        unknown = sorted(set(self.frames[position]) - set(allowed))
        if unknown:
            raise ShardSetError(f"{self._where(position)} holds member(s) {unknown}; only {list(allowed)} are "
                                f"accepted (pickle-based members are never decoded): {_FIX}")
        return {name: self._member(position, name) for name in allowed}

    def _member(self, position: int, name: str) -> Any:
        try:
            raw = self.frames[position][name]
            value = json.loads(bytes(raw)) if name.endswith(".json") else decode_npy(raw)
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise ShardSetError(f"{self._where(position)}: member {name} cannot be decoded safely "
                                f"({type(exc).__name__}: {exc}); {_FIX}") from None
        if name in self.fmt.shapes and value.shape != self.fmt.shapes[name]:
            raise ShardSetError(f"{self._where(position)}: {name} has shape {value.shape}, the manifest implies "
                                f"{self.fmt.shapes[name]}: {_FIX}")
        return value

    def _where(self, position: int) -> str:
        return f"frame {frame_key(self.split, position)} ({self.where})"
