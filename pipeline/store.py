"""The features.zarr contract: array schema, encodings, root attrs, and a checked opener.

The build writes against this module, `inspect` validates against it, and downstream code opens
stores through `open_features`, so a half-built or foreign store is caught in one place.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path
from typing import Any

import numcodecs
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from pipeline.config import BuildConfig, PipelineConfig, config_hash
from pipeline.scan import order_dtype

SCHEMA_VERSION = 1
PROGRESS_GROUP = "build_progress"  # per-block done flags and moments (a subgroup: invisible to xarray)
ORDER = "order"  # placeholder dtype: int16, or int32 beyond 32767 tokens

SCHEMA: dict[str, tuple[tuple[str, ...], str]] = {
    "fields": (("time", "var", "lat", "lon"), "float32"),
    "elevation": (("lat", "lon"), "float32"),
    "loss_mask": (("lat", "lon"), "bool"),
    "patch_elevation": (("token",), "float32"),
    "patch_elevation_std": (("token",), "float32"),
    "wind_speed": (("time", "token"), "float32"),
    "region_sector": (("time", "region"), "int8"),
    "global_sector": (("time",), "int8"),
    "scan_order": (("time", "token"), ORDER),
    "scan_order_global": (("time", "token"), ORDER),
    "stats_mean": (("var",), "float64"),
    "stats_std": (("var",), "float64"),
}
TIME_ARRAYS = tuple(name for name, (dims, _) in SCHEMA.items() if "time" in dims)


class StoreError(ValueError):
    """A feature store that is missing, unfinished, foreign or built from other inputs."""


def expected_dtype(name: str, n_tokens: int) -> str:
    """The dtype `name` must have in a store with n_tokens tokens."""
    dtype = SCHEMA[name][1]
    return str(order_dtype(n_tokens)) if dtype == ORDER else dtype


def partial_path(store: str | Path) -> Path:
    """Where an unfinished build lives; renamed to `store` only when complete."""
    store = Path(store)
    return store.with_name(store.name + ".partial")


def fingerprint(cfg: PipelineConfig, source_fp: str) -> dict[str, str]:
    """What the store's content depends on: the data config (minus paths), its chunking, and the source."""
    data = cfg.data.model_copy(update={"raw": Path(), "store": Path(), "shards": Path()})
    layout = BuildConfig(**cfg.build.model_dump(include={"time_chunk", "zarr_format", "compressor", "compressor_level"}))
    content = PipelineConfig(data=data, build=layout)
    return {"config_hash": config_hash(content), "source_fingerprint": source_fp}


def root_attrs(cfg: PipelineConfig, fp: dict[str, str]) -> dict[str, Any]:
    """CF-friendly root attrs with everything a consumer needs to interpret the arrays."""
    d = cfg.data
    return {
        "Conventions": "CF-1.8",
        "title": "TopoFlow feature store (inputs, patch statics, wind scan orders, train statistics)",
        "schema_version": SCHEMA_VERSION,
        "grid": [d.domain.n_lat, d.domain.n_lon],
        "patch_size": d.patch_size,
        "patch_grid": list(d.patch_grid),
        "regions": list(d.regions),
        "sectors": d.sectors,
        "calm_threshold": d.calm_threshold,
        "variables": d.variable_names,
        "units": {v.name: v.units for v in d.variables},
        "targets": list(d.targets),
        "wind": list(d.wind),
        "splits": {k: [r.start.isoformat(), r.end.isoformat()] for k, r in d.splits.items()},
        "leads_h": list(d.leads_h),
        "step_hours": d.sample.step_hours,
        "provenance": {
            **fp,
            "source": Path(d.raw).name,
            "package_version": importlib.metadata.version("topoflow"),
            "xarray": xr.__version__,
            "zarr": zarr.__version__,
        },
        "build_state": "building",
    }


def encodings(ds: xr.Dataset, cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Blosc (build.compressor) with byte shuffle for every data array; chunks follow the dask chunks of `ds`."""
    name, level = cfg.build.compressor, cfg.build.compressor_level
    if cfg.build.zarr_format == 3:
        codec: Any = BloscCodec(cname=name, clevel=level, shuffle="shuffle")
    else:
        codec = numcodecs.Blosc(cname=name, clevel=level, shuffle=numcodecs.Blosc.SHUFFLE)
    return {name: {"compressors": (codec,)} for name in ds.data_vars}


def consolidate(path: str | Path) -> None:
    """Refresh consolidated metadata (xarray opens stores through it); quiet about v3's extension status."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def read_attrs(path: str | Path) -> dict[str, Any] | None:
    """Root attrs of a Zarr group, or None when `path` is not a readable Zarr group."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # not a group, or unreadable metadata: both mean "not a feature store"
        return None


def open_features(path: str | Path) -> xr.Dataset:
    """Open a finished feature store lazily; a missing, unfinished or foreign store is a clear error."""
    path = Path(path)
    if not path.exists():
        hint = " (an unfinished build exists: rerun `python -m pipeline build` to resume it)" if partial_path(
            path).exists() else ""
        raise StoreError(f"feature store {path} does not exist{hint}; run `python -m pipeline build --config ...`")
    attrs = read_attrs(path)
    if attrs is None or "schema_version" not in attrs:
        raise StoreError(f"{path} is not a feature store written by `python -m pipeline build`; rebuild it")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {attrs['schema_version']}, this code reads {SCHEMA_VERSION}; "
            "rebuild it with `python -m pipeline build --overwrite`"
        )
    if attrs.get("build_state") != "complete":
        raise StoreError(
            f"feature store {path} is unfinished (build_state={attrs.get('build_state')!r}); "
            "rerun `python -m pipeline build` to finish it"
        )
    return xr.open_zarr(path, consolidated=True)
