"""`build_features`: store contents against numpy, outside readers, resume, fingerprints, CLI, SLURM."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import cf_xarray  # noqa: F401 - registers ds.cf
import cf_xarray.units
import numpy as np
import pandas as pd
import pint_xarray  # noqa: F401 - registers ds.pint
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import xarray as xr
import zarr
from distributed import Future

from pipeline import build
from pipeline.build import build_features
from pipeline.cluster import slurm_cluster
from pipeline.config import PipelineConfig, SlurmConfig, TimeRange, load_pipeline_config
from pipeline.features import OUTPUTS
from pipeline.scan import scan_orders
from pipeline.sources import files
from pipeline.statistics import ChangePlan, block_moments, merge_moments
from pipeline.store import PROGRESS_GROUP, open_features, partial_path, read_record
from tests.helpers import source_path, tiny_raw_config, with_source_path, write_config, write_synthetic_source
from tests.kill import assert_same_tree
from topoflow.errors import StoreError


def in_process(tmp_path: Path, **build_overrides) -> PipelineConfig:
    """Tiny config (3 blocks of 16 steps) on one in-process worker (fast), written with its source."""
    raw = tiny_raw_config(tmp_path)
    raw["build"].update({"processes": False, "time_chunk": 16, **build_overrides})
    cfg = load_pipeline_config(write_config(raw, tmp_path / "tiny.yaml"))
    write_synthetic_source(cfg)
    return cfg


def ascending_source(cfg: PipelineConfig) -> xr.Dataset:
    return xr.open_dataset(source_path(cfg)).load().sortby("latitude")


def assert_same_store(a: Path, b: Path) -> None:
    da_, db = xr.open_zarr(a), xr.open_zarr(b)
    keep = lambda attrs: {k: v for k, v in attrs.items() if k not in ("history", "provenance")}  # noqa: E731
    assert keep(da_.attrs) == keep(db.attrs)
    xr.testing.assert_equal(da_.load(), db.load())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> PipelineConfig:
    cfg = in_process(tmp_path_factory.mktemp("built"))
    build_features(cfg, progress=False)
    return cfg


def test_store_layout_follows_the_feature_table(built):
    ds, record = open_features(built.data.store)
    assert set(ds.dims) == {"time", "var", "static_var", "lat", "lon", "token", "region"}
    for name, out in OUTPUTS.items():
        assert ds[name].dims == out.dims and ds[name].dtype == out.dtype_for(record), name
    assert list(ds["var"].values) == built.data.dynamic_names  # statics and coordinates are not in fields
    assert list(ds["static_var"].values) == ["elevation", "population"]
    assert (np.diff(ds["lat"].values) > 0).all() and ds["valid"].values.all()
    assert ds["fields"].encoding["chunks"] == (16, 1, 8, 16)
    assert record.build_state == "complete" and record.layout.grid == (8, 16) and record.schema_version == 3
    assert record.provenance.config_hash and record.provenance.recipe["step_hours"] == 3
    assert record.history.endswith(f"(topoflow {record.provenance.package_version})")
    assert ds["scan_order"].dtype == np.int16
    group = zarr.open_group(built.data.store, mode="r")
    assert group.metadata.zarr_format == 3 and PROGRESS_GROUP not in group  # progress removed when complete
    assert not partial_path(built.data.store).exists()


def test_outside_readers_need_nothing_from_this_project(built):
    """cf-xarray finds T/Y/X, pint-xarray quantifies with CF unit strings, plain zarr reads the arrays."""
    ds = xr.open_zarr(built.data.store)
    assert ds.cf["T"].name == "time" and ds.cf["latitude"].name == "lat" and ds.cf["X"].name == "lon"
    assert "surface_altitude" in ds.cf.standard_names
    quantified = ds.pint.quantify(unit_registry=cf_xarray.units.units)
    assert str(quantified["wind_speed"].pint.units) == "meter / second"
    pm25 = ds["fields"].sel(var="pm25").pint.quantify(str(ds["var_units"].sel(var="pm25").values),
                                                      unit_registry=cf_xarray.units.units)
    assert float(pm25.pint.to("kg m-3").max()) == pytest.approx(float(ds["fields"].sel(var="pm25").max()) * 1e-9)
    assert str(ds["var_standard_name"].sel(var="u").values) == "u_standard"  # kept from the source
    assert str(ds["var_long_name"].sel(var="u").values) == "u (synthetic)"
    group = zarr.open_group(built.data.store, mode="r")
    np.testing.assert_array_equal(group["fields"][:], ds["fields"].values)
    assert group.attrs["step_hours"] == 3


def test_fields_statics_and_mask_are_the_source_with_latitude_ascending(built):
    src = ascending_source(built)
    ds, _ = open_features(built.data.store)
    names = {**{k: v for k, v in built.data.sources[0].variables.items()},
             **{k: v for k, v in built.data.sources[1].variables.items()}}
    for spec in built.data.variables:
        if spec.kind == "dynamic":
            got = ds["fields"].sel(var=spec.name).values
        elif spec.kind == "static":
            got = ds["static"].sel(static_var=spec.name).values
        else:
            continue
        np.testing.assert_array_equal(got, src[names[spec.name].var].values.astype(np.float32), err_msg=spec.name)
    np.testing.assert_array_equal(ds["elevation"].values, src["orography"].values)
    np.testing.assert_array_equal(ds["loss_mask"].values, src["lsm"].values >= 0.5)


def test_hdf5_fast_path_gives_the_store_xarray_reads(tmp_path, monkeypatch):
    """Blocks read straight from HDF5 (`Catalog.read`) build the same bytes as blocks read through xarray:
    every array (fields, features, statistics) and the record."""
    fast, key = [], files.hdf5_key.__wrapped__  # uncached: every call is counted

    def counted(*args: object) -> object:
        found = key(*args)
        fast.append(found is not None)
        return found

    monkeypatch.setattr(files, "hdf5_key", counted)
    cfg = in_process(tmp_path)
    build_features(cfg, progress=False)
    assert fast and all(fast)  # every dynamic read took the fast path
    monkeypatch.setattr(files, "hdf5_key", lambda *args: None)  # every read through xarray
    slow = cfg.model_copy(deep=True)
    slow.data.store = tmp_path / "xarray.zarr"
    build_features(slow, progress=False)
    assert_same_tree(Path(slow.data.store), Path(cfg.data.store))


def test_patch_fields_against_numpy(built):
    src = ascending_source(built)
    ds, _ = open_features(built.data.store)
    elev = src["orography"].values.astype(np.float64)
    blocks = elev.reshape(4, 2, 8, 2).transpose(0, 2, 1, 3).reshape(32, 4)
    np.testing.assert_allclose(ds["patch_elevation"].values, blocks.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(ds["patch_elevation_std"].values, blocks.std(axis=1), rtol=1e-5)
    u, v = src["u10"].values.astype(np.float64), src["v10"].values.astype(np.float64)
    speed = np.sqrt(u**2 + v**2).reshape(48, 4, 2, 8, 2).mean(axis=(2, 4)).reshape(48, 32)
    np.testing.assert_allclose(ds["wind_speed"].values, speed, rtol=1e-5)


def test_scan_orders_and_sectors_match_the_rule(built):
    src = ascending_source(built)
    ds, _ = open_features(built.data.store)
    u, v = src["u10"].values, src["v10"].values
    order, sector = scan_orders(u, v, 2, (2, 2))
    np.testing.assert_array_equal(ds["scan_order"].values, order)
    np.testing.assert_array_equal(ds["region_sector"].values, sector)
    glob, gsector = scan_orders(u, v, 2, (2, 2), mode="global")
    np.testing.assert_array_equal(ds["scan_order_global"].values, glob)
    np.testing.assert_array_equal(ds["global_sector"].values, gsector[:, 0])


def test_statistics_over_the_training_period_only(built):
    src = ascending_source(built)
    ds, _ = open_features(built.data.store)
    train = built.data.splits["train"]
    in_train = ((src["time"] >= pd.Timestamp(train.start)) & (src["time"] <= pd.Timestamp(train.end))).values
    assert 0 < int(in_train.sum()) < src.sizes["time"]
    fields = ds["fields"].values[in_train].astype(np.float64)
    np.testing.assert_allclose(ds["stats_mean"].values, fields.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(ds["stats_std"].values, fields.std(axis=(0, 2, 3)), rtol=1e-9)
    everything = ds["fields"].values.astype(np.float64).mean(axis=(0, 2, 3))
    assert not np.allclose(ds["stats_mean"].values, everything, rtol=1e-6)
    static = ds["static"].values.astype(np.float64)
    np.testing.assert_allclose(ds["static_mean"].values, static.mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds["static_std"].values, static.std(axis=(1, 2)), rtol=1e-12)


def test_change_spread_is_recorded_and_matches_numpy(built):
    """The per-lead change std of each target over the train split (pairs inside it), in the record."""
    ds, record = open_features(built.data.store)
    train = record.splits["train"]
    idx = np.flatnonzero((ds.time.values >= np.datetime64(train.start)) & (ds.time.values <= np.datetime64(train.end)))
    fields = ds["fields"].values[idx][:, record.target_index].astype(np.float64)
    for li, lead in enumerate(record.leads_h):
        k = lead // record.step_hours
        want = (fields[k:] - fields[:-k]).std(axis=(0, 2, 3))
        np.testing.assert_allclose(record.change_std[li], want, rtol=1e-9)
        assert record.change_pairs[li] == len(idx) - k


@given(st.integers(0, 60), st.integers(0, 60), st.sampled_from(["h", "s", "ns"]))
def test_a_time_range_covers_its_ends_and_nothing_outside(first, length, unit):
    hours = pd.date_range("2016-01-01", periods=130, freq="h")
    period = TimeRange(start=hours[first].to_pydatetime(), end=hours[first + length].to_pydatetime())
    expected = [period.start <= t <= period.end for t in hours.to_pydatetime()]
    assert period.covers(hours.values.astype(f"datetime64[{unit}]")).tolist() == expected
    assert period.covers(hours).tolist() == expected
    assert period.covers(hours.values).sum() == length + 1


def test_change_plan_samples_inputs_thins_cells_and_skips_unusable_targets():
    usable = np.ones(100, dtype=bool)
    usable[[10, 50]] = False  # gaps
    usable[80:] = False  # past the train split
    plan = ChangePlan.create(usable, [2, 40, 200], (40, 60), block=25, max_inputs=5, max_cells=600)
    assert plan.inputs.tolist() == [0, 20, 39, 60, 79]  # evenly spread over the 78 usable steps
    assert plan.stride == 2 and plan.storage(4, 3, (40, 60)) == (4, 4, 3, 20, 30)  # block 0 holds 0, 2, 20, 22
    assert 79 + 2 not in plan.frames and 39 + 40 in plan.frames and 0 + 40 in plan.frames
    rng = np.random.default_rng(0)
    full = rng.normal(size=(100, 3, 40, 60)).astype(np.float32)
    stored = np.full(plan.storage(4, 3, (40, 60)), np.nan, np.float32)
    for b in range(4):  # as the build's block tasks store them
        steps = plan.block_frames(25 * b, 25 * b + 25)
        stored[b, :len(steps)] = plan.thin(full[steps])
    np.testing.assert_array_equal(plan.gather(stored), plan.thin(full[plan.frames]))
    std, pairs = plan.spread(plan.gather(stored))
    assert pairs == [4, 3, 0] and np.isnan(std[2]).all()  # 79 + 2 is past the split; 200 steps has no pair
    x = full[:, :, ::2, ::2].astype(np.float64)
    want = np.concatenate([x[[i + 40]] - x[[i]] for i in (0, 20, 39)]).std(axis=(0, 2, 3))
    np.testing.assert_allclose(std[1], want, rtol=1e-12)
    assert plan.block_frames(25, 50).tolist() == [f for f in plan.frames if 25 <= f < 50]


def test_merged_moments_are_nan_aware():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(10, 2, 4, 4))
    x[3, 1, 2, 2] = np.nan
    parts = [block_moments(x[a:b])[None] for a, b in ((0, 3), (3, 7), (7, 10))]
    mean, std = merge_moments(np.concatenate(parts))
    np.testing.assert_allclose(mean, np.nanmean(x, axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, np.nanstd(x, axis=(0, 2, 3)), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(1, 11), max_size=3, unique=True),
       holes=st.integers(0, 40), empty_variable=st.booleans())
def test_block_moments_pool_to_the_moments_of_the_whole(seed, cuts, holes, empty_variable):
    """Blocks cut anywhere, cells missing anywhere, a variable with no value at all (its mean is NaN)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1e5, 500.0, size=(12, 3, 5, 7)).astype(np.float32)  # pressure-like: large mean, small spread
    x.reshape(-1)[rng.choice(x.size, holes, replace=False)] = np.nan
    if empty_variable:
        x[:, 2] = np.nan
    edges = [0, *sorted(cuts), 12]
    mean, std = merge_moments(np.stack([block_moments(x[a:b]) for a, b in zip(edges, edges[1:])]))
    kept = x[:, :2].astype(np.float64)
    np.testing.assert_allclose(mean[:2], np.nanmean(kept, axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(std[:2], np.nanstd(kept, axis=(0, 2, 3)), rtol=1e-9)
    assert np.isnan(mean[2]) == empty_variable and np.isnan(std[2]) == empty_variable


def test_a_rebuild_at_the_same_path_in_one_process_writes_the_new_layout(tmp_path, built):
    """Block tasks keep their arrays open per store; a rebuild (another period, so other shapes) at the same
    path in the same process must not write through the old handles."""
    cfg = in_process(tmp_path)
    build_features(cfg, progress=False)
    shorter = load_pipeline_config(tmp_path / "tiny.yaml", ["data.splits.test.end=2018-01-05T21:00"])
    build_features(shorter, overwrite=True, progress=False)
    fresh = shorter.model_copy(deep=True)
    fresh.data.store = tmp_path / "fresh.zarr"
    build_features(fresh, progress=False)
    assert xr.open_zarr(shorter.data.store).sizes["time"] == 40
    assert_same_store(shorter.data.store, fresh.data.store)


def test_resume_after_failure_equals_uninterrupted(tmp_path, built, monkeypatch):
    cfg = in_process(tmp_path)
    shutil.copy2(source_path(built), source_path(cfg))
    original = build.read_block
    fail_from = np.datetime64("2018-01-05T00:00")  # block 2 of 0..2

    def failing(config, times):
        if times.min() >= fail_from:
            time.sleep(0.3)  # let the earlier blocks finish first
            raise RuntimeError("injected worker failure")
        return original(config, times)

    monkeypatch.setattr(build, "read_block", failing)
    with pytest.raises(RuntimeError, match="injected"):
        build_features(cfg, progress=False)
    partial = partial_path(cfg.data.store)
    assert not Path(cfg.data.store).exists()
    assert read_record(partial).build_state == "building"
    done = build.finished_blocks(zarr.open_group(str(partial / PROGRESS_GROUP))[build.MOMENTS][:])
    assert done[:2].all() and not done[2:].any()
    with pytest.raises(StoreError, match="resume"):
        open_features(cfg.data.store)
    finished = {partial / f"fields/c/{i}/0/0/0": (partial / f"fields/c/{i}/0/0/0").stat().st_mtime_ns
                for i in np.flatnonzero(done)}

    monkeypatch.setattr(build, "read_block", original)
    build_features(cfg, progress=False)
    assert_same_store(cfg.data.store, built.data.store)
    for p, mtime in finished.items():  # blocks finished before the failure were not rewritten
        assert (Path(cfg.data.store) / p.relative_to(partial)).stat().st_mtime_ns == mtime


def test_each_block_task_records_its_own_moments_and_the_main_process_fetches_nothing(tmp_path, monkeypatch):
    """The main process only counts finished futures: a block is recorded by the task that wrote it, and no
    result travels back through the scheduler."""
    cfg = in_process(tmp_path)
    monkeypatch.setattr(Future, "result", lambda *a, **k: pytest.fail("the main process fetched a block's result"))
    monkeypatch.setattr(build, "finalise", lambda *a, **k: None)  # keep the progress group to look at
    build_features(cfg, progress=False)
    partial = partial_path(cfg.data.store)
    moments = zarr.open_group(str(partial / PROGRESS_GROUP))[build.MOMENTS][:]
    assert build.finished_blocks(moments).all()
    ds, record = xr.open_zarr(partial, consolidated=False), read_record(partial)
    split, times = record.splits["train"], ds["time"].values
    train = (times >= np.datetime64(split.start)) & (times <= np.datetime64(split.end))
    fields = ds["fields"].values
    for i, start in enumerate(range(0, ds.sizes["time"], cfg.build.time_chunk)):
        kept = fields[start:start + cfg.build.time_chunk][train[start:start + cfg.build.time_chunk]]
        if len(kept):
            np.testing.assert_allclose(moments[i], block_moments(kept), rtol=1e-12, atol=1e-9, err_msg=f"block {i}")
        else:  # a block after the train split: recorded (done) with no values
            assert (moments[i, :, 0] == 0).all()
    assert 0 < train.sum() < len(train)


def test_changed_config_or_source_is_refused_naming_the_change(tmp_path, built):
    store = tmp_path / "features.zarr"
    shutil.copytree(built.data.store, store)
    same = built.model_copy(deep=True)
    same.data.store = store
    assert build_features(same, progress=False) == store  # unchanged inputs: up to date, nothing rebuilt
    changed = same.model_copy(deep=True)
    changed.data.calm_threshold = 3.0
    with pytest.raises(StoreError, match=r"data.calm_threshold: stored 0.5, config 3.0(.|\n)*--overwrite"):
        build_features(changed, progress=False)
    assert read_record(store).calm_threshold == 0.5  # untouched
    other_source = with_source_path(same, tmp_path / "raw.nc")
    write_synthetic_source(other_source, seed=7)
    with pytest.raises(StoreError, match="content fingerprint"):
        build_features(other_source, progress=False)
    build_features(changed, overwrite=True, progress=False)
    ds, record = open_features(store)
    assert record.calm_threshold == 3.0 and (ds["region_sector"] == -1).any()
    assert not store.with_name("features.zarr.old").exists()


def test_a_copied_source_keeps_its_fingerprint(tmp_path, built):
    """`cp` gives the source new mtimes and inodes; its content fingerprint, and so the store, still hold."""
    copy = tmp_path / "raw.nc"
    shutil.copyfile(source_path(built), copy)  # no copystat: a new mtime
    store = tmp_path / "features.zarr"
    shutil.copytree(built.data.store, store)
    cfg = with_source_path(built, copy)
    cfg.data.store = store
    assert build_features(cfg, progress=False) == store


def test_zarr_format_2_on_request(tmp_path):
    cfg = in_process(tmp_path, zarr_format=2, time_chunk=48)
    build_features(cfg, progress=False)
    assert zarr.open_group(cfg.data.store).metadata.zarr_format == 2
    ds, _ = open_features(cfg.data.store)
    assert ds["fields"].encoding["chunks"] == (48, 1, 8, 16)
    assert np.isfinite(ds["stats_std"].values).all()


def test_an_older_schema_is_refused_with_the_fix(tmp_path, built):
    store = tmp_path / "features.zarr"
    shutil.copytree(built.data.store, store)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["schema_version"] = 2
    with pytest.raises(StoreError, match="schema version 2.*rebuild it with.*--overwrite"):
        open_features(store)


def test_default_local_cluster_store_and_cli(tiny_store, capsys):
    """tiny_store was built through the default LocalCluster (worker processes); the CLI sees it up to date."""
    ds, _ = open_features(tiny_store.data.store)
    assert ds.sizes["time"] == 48 and np.isfinite(ds["stats_mean"].values).all()
    src = ascending_source(tiny_store)
    np.testing.assert_array_equal(ds["fields"].sel(var="u").values, src["u10"].values)
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    config_path = Path(tiny_store.data.store).parent / "tiny.yaml"
    assert build.run(parser.parse_args(["--config", str(config_path)])) == 0
    assert "up to date" in capsys.readouterr().out


def test_slurm_cluster_job_script_from_config():
    cfg = SlurmConfig(queue="cpu", account="proj42", cores=16, processes=8, memory="64GB", walltime="03:00:00", jobs=3)
    with slurm_cluster(cfg) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p cpu", "#SBATCH -A proj42", "#SBATCH -t 03:00:00", "--nworkers 8", "--nthreads 2"):
        assert line in script
