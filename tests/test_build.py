"""`build_features`: store contents against numpy, resume after a failure, fingerprints, CLI, SLURM."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

import pipeline.features
from pipeline import build
from pipeline.build import build_features
from pipeline.cluster import slurm_cluster
from pipeline.config import PipelineConfig, SlurmConfig, load_pipeline_config
from pipeline.features import block_moments, merge_moments
from pipeline.scan import scan_orders
from pipeline.store import PROGRESS_GROUP, SCHEMA, StoreError, open_features, partial_path
from conftest import tiny_raw_config, write_config, write_synthetic_source


def in_process(tmp_path: Path, **build_overrides) -> PipelineConfig:
    """Tiny config (3 blocks of 16 steps) on one in-process worker (fast), written with its source."""
    raw = tiny_raw_config(tmp_path)
    raw["build"].update({"processes": False, "time_chunk": 16, **build_overrides})
    cfg = load_pipeline_config(write_config(raw, tmp_path / "tiny.yaml"))
    write_synthetic_source(cfg)
    return cfg


def ascending_source(cfg: PipelineConfig) -> xr.Dataset:
    return xr.open_dataset(cfg.data.raw).load().sortby("latitude")


def assert_same_store(a: Path, b: Path) -> None:
    da_, db = xr.open_zarr(a), xr.open_zarr(b)
    assert da_.attrs == db.attrs
    xr.testing.assert_identical(da_.load(), db.load())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> PipelineConfig:
    cfg = in_process(tmp_path_factory.mktemp("built"))
    build_features(cfg, progress=False)
    return cfg


def test_store_opens_with_named_dims_and_cf_attrs(built):
    ds = xr.open_zarr(built.data.store)
    assert set(ds.dims) == {"time", "var", "lat", "lon", "token", "region"}
    for name, (dims, _) in SCHEMA.items():
        assert ds[name].dims == dims
    assert list(ds["var"].values) == built.data.variable_names
    assert (np.diff(ds["lat"].values) > 0).all()
    assert ds["fields"].encoding["chunks"] == (16, 15, 8, 16)
    assert ds.attrs["build_state"] == "complete" and ds.attrs["grid"] == [8, 16]
    assert ds.attrs["provenance"]["config_hash"] and ds["lat"].attrs["standard_name"] == "latitude"
    assert ds["scan_order"].dtype == np.int16
    assert zarr.open_group(built.data.store).metadata.zarr_format == 3
    assert not partial_path(built.data.store).exists()
    xr.testing.assert_identical(open_features(built.data.store), ds)


def test_fields_are_the_source_with_latitude_ascending(built):
    src = ascending_source(built)
    ds = open_features(built.data.store)
    for spec in built.data.variables:
        got = ds["fields"].sel(var=spec.name).values
        if spec.kind == "dynamic":
            want = src[spec.source].values
        elif spec.kind == "static":
            want = np.broadcast_to(src[spec.source].values, got.shape)
        else:
            lat2d, lon2d = np.meshgrid(src["latitude"].values, src["longitude"].values, indexing="ij")
            want = np.broadcast_to(lat2d if spec.name == "lat2d" else lon2d, got.shape)
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=spec.name)
    np.testing.assert_array_equal(ds["loss_mask"].values, src["lsm"].values >= 0.5)


def test_patch_fields_against_numpy(built):
    src = ascending_source(built)
    ds = open_features(built.data.store)
    elev = src["orography"].values.astype(np.float64)
    blocks = elev.reshape(4, 2, 8, 2).transpose(0, 2, 1, 3).reshape(32, 4)
    np.testing.assert_allclose(ds["patch_elevation"].values, blocks.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(ds["patch_elevation_std"].values, blocks.std(axis=1), rtol=1e-5)
    u, v = src["u10"].values.astype(np.float64), src["v10"].values.astype(np.float64)
    speed = np.sqrt(u**2 + v**2).reshape(48, 4, 2, 8, 2).mean(axis=(2, 4)).reshape(48, 32)
    np.testing.assert_allclose(ds["wind_speed"].values, speed, rtol=1e-5)


def test_scan_orders_and_sectors_match_the_rule(built):
    src = ascending_source(built)
    ds = open_features(built.data.store)
    u, v = src["u10"].values, src["v10"].values
    order, sector = scan_orders(u, v, 2, (2, 2))
    np.testing.assert_array_equal(ds["scan_order"].values, order)
    np.testing.assert_array_equal(ds["region_sector"].values, sector)
    glob, gsector = scan_orders(u, v, 2, (2, 2), mode="global")
    np.testing.assert_array_equal(ds["scan_order_global"].values, glob)
    np.testing.assert_array_equal(ds["global_sector"].values, gsector[:, 0])


def test_statistics_over_the_training_period_only(built):
    src = ascending_source(built)
    ds = open_features(built.data.store)
    train = built.data.splits["train"]
    in_train = (src["time"] >= pd.Timestamp(train.start)) & (src["time"] <= pd.Timestamp(train.end))
    assert 0 < int(in_train.sum()) < src.sizes["time"]
    fields = ds["fields"].values[in_train.values].astype(np.float64)
    np.testing.assert_allclose(ds["stats_mean"].values, fields.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(ds["stats_std"].values, fields.std(axis=(0, 2, 3)), rtol=1e-9)
    everything = ds["fields"].values.astype(np.float64).mean(axis=(0, 2, 3))
    assert not np.allclose(ds["stats_mean"].values[:10], everything[:10], rtol=1e-6)
    assert ds["stats_mean"].dtype == np.float64


def test_merged_moments_are_nan_aware():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(10, 2, 4, 4))
    x[3, 1, 2, 2] = np.nan
    parts = [block_moments(x[a:b]) for a, b in ((0, 3), (3, 7), (7, 10))]
    mean, std = merge_moments(np.concatenate(parts))
    np.testing.assert_allclose(mean, np.nanmean(x, axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, np.nanstd(x, axis=(0, 2, 3)), rtol=1e-12)


def test_resume_after_failure_equals_uninterrupted(tmp_path, built, monkeypatch):
    cfg = in_process(tmp_path)
    shutil.copy2(built.data.raw, cfg.data.raw)  # same bytes and mtime -> same fingerprint as `built`
    fail_from = np.datetime64("2018-01-05T00:00").astype("datetime64[ns]").view(np.int64)  # block 2 of 0..2
    original = pipeline.features._train_moments

    def failing(fields, times, *args):
        if times.min() >= fail_from:
            time.sleep(0.3)  # let the earlier blocks finish first
            raise RuntimeError("injected worker failure")
        return original(fields, times, *args)

    monkeypatch.setattr(pipeline.features, "_train_moments", failing)
    with pytest.raises(RuntimeError, match="injected"):
        build_features(cfg, progress=False)
    partial = partial_path(cfg.data.store)
    assert not Path(cfg.data.store).exists()
    assert zarr.open_group(str(partial)).attrs["build_state"] == "building"
    done = zarr.open_group(str(partial / PROGRESS_GROUP))["done"][:]
    assert done[:2].any() and not done[2:].any()
    with pytest.raises(StoreError, match="resume"):
        open_features(cfg.data.store)
    finished = {p: p.stat().st_mtime_ns for i in np.flatnonzero(done) for p in [partial / f"fields/c/{i}/0/0/0"]}

    monkeypatch.setattr(pipeline.features, "_train_moments", original)
    build_features(cfg, progress=False)
    assert_same_store(cfg.data.store, built.data.store)
    for p, mtime in finished.items():  # blocks finished before the failure were not rewritten
        rel = p.relative_to(partial)
        assert (Path(cfg.data.store) / rel).stat().st_mtime_ns == mtime


def test_changed_config_or_source_is_refused_unless_overwrite(tmp_path, built):
    store = tmp_path / "features.zarr"
    shutil.copytree(built.data.store, store)
    same = built.model_copy(deep=True)
    same.data.store = store
    assert build_features(same, progress=False) == store  # unchanged inputs: up to date, nothing rebuilt
    changed = same.model_copy(deep=True)
    changed.data.calm_threshold = 3.0
    with pytest.raises(StoreError, match="config_hash.*--overwrite"):
        build_features(changed, progress=False)
    assert xr.open_zarr(store).attrs["calm_threshold"] == 0.5  # untouched
    other_source = same.model_copy(deep=True)
    other_source.data.raw = tmp_path / "raw.nc"
    write_synthetic_source(other_source, seed=7)
    with pytest.raises(StoreError, match="source_fingerprint.*--overwrite"):
        build_features(other_source, progress=False)
    build_features(changed, overwrite=True, progress=False)
    ds = open_features(store)
    assert ds.attrs["calm_threshold"] == 3.0 and (ds["region_sector"] == -1).any()
    assert not store.with_name("features.zarr.old").exists()


def test_zarr_format_2_on_request(tmp_path):
    cfg = in_process(tmp_path, zarr_format=2, time_chunk=48)
    build_features(cfg, progress=False)
    assert zarr.open_group(cfg.data.store).metadata.zarr_format == 2
    ds = open_features(cfg.data.store)
    assert ds["fields"].encoding["chunks"] == (48, 15, 8, 16)
    assert np.isfinite(ds["stats_std"].values).all()


def test_default_local_cluster_store_and_cli(tiny_store, capsys):
    """tiny_store was built through the default LocalCluster (worker processes); the CLI sees it up to date."""
    ds = open_features(tiny_store.data.store)
    assert ds.sizes["time"] == 48 and np.isfinite(ds["stats_mean"].values).all()
    src = ascending_source(tiny_store)
    np.testing.assert_array_equal(ds["fields"].sel(var="u").values, src["u10"].values)
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    config_path = Path(tiny_store.data.store).parent / "tiny.yaml"
    assert build.run(parser.parse_args(["--config", str(config_path)])) == 0
    assert "up to date" in capsys.readouterr().out


def test_slurm_cluster_job_script_from_config():
    cfg = SlurmConfig(queue="cpu", account="proj42", cores=16, memory="64GB", walltime="03:00:00", jobs=3)
    with slurm_cluster(cfg) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p cpu", "#SBATCH -A proj42", "#SBATCH -t 03:00:00", "--nthreads 16"):
        assert line in script

