"""The shard sample format: which members a sample holds, how they are encoded and decoded.

Writer (`pipeline.shard`), loader (`train.loader`) and `inspect` share this module, so a sample is
defined once. Everything is `.npy` (decoded with allow_pickle=False) or `.json`: nothing is ever
unpickled, and any other member is refused.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import webdataset as wds

from pipeline.features import STATIC_OUTPUTS, TIME_OUTPUTS
from pipeline.records import StoreRecord
from topoflow.errors import ShardSetError

SAMPLE_MEMBERS = (*(o.member for o in TIME_OUTPUTS if o.member), "target.npy", "meta.json")
STATIC_MEMBERS = (*(o.member for o in STATIC_OUTPUTS if o.member), "lat.npy", "lon.npy")
ENCODERS = {  # explicit, so nothing can ever be pickled into a shard
    "npy": wds.writer.numpy_dumps,
    "json": lambda obj: json.dumps(obj, sort_keys=True).encode("utf-8"),
}
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], str, int]] = {}


def member_shapes(record: StoreRecord) -> dict[str, tuple[int, ...]]:
    """Shape of each .npy sample member implied by the store's record."""
    h, w = record.layout.grid
    n_tok = record.layout.n_tokens
    return {"input.npy": (len(record.names("dynamic")), h, w),
            "target.npy": (len(record.leads_h), len(record.targets), h, w),
            "scan_order.npy": (n_tok,), "scan_order_global.npy": (n_tok,), "wind_speed.npy": (n_tok,)}


def decode_npy(raw: bytes) -> np.ndarray:
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


def decode_sample(sample: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Decode a raw sample (member name -> bytes); a foreign member, a pickled array or a wrong shape is a
    ShardSetError naming the sample and its shard."""
    where = f"sample {sample.get('__key__')} ({sample.get('__url__', '?')})"
    unknown = sorted(set(sample) - set(SAMPLE_MEMBERS) - {"__key__", "__url__", "__local_path__"})
    if unknown:
        raise ShardSetError(f"{where} holds member(s) {unknown}; only {list(SAMPLE_MEMBERS)} are accepted (pickle-"
                            "based members are never decoded): rewrite the shard set with `python -m pipeline shard`")
    out: dict[str, Any] = {"__key__": sample["__key__"]}
    for name in SAMPLE_MEMBERS:
        try:
            out[name] = json.loads(sample[name]) if name.endswith(".json") else decode_npy(sample[name])
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise ShardSetError(f"{where}: member {name} cannot be decoded safely ({type(exc).__name__}: {exc}); "
                                "rewrite the shard set with `python -m pipeline shard`") from None
    for name, shape in shapes.items():
        if out[name].shape != shape:
            raise ShardSetError(f"{where}: {name} has shape {out[name].shape}, the manifest implies {shape}: "
                                "rewrite the shard set")
    return out
