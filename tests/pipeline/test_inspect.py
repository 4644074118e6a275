"""`python -m pipeline inspect`: passes on good stores and shard sets, fails (exit 1) on each damage."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import inspect
from pipeline.config import PipelineConfig


def run_inspect(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    inspect.add_arguments(parser)
    return inspect.run(parser.parse_args(list(argv)))


@pytest.fixture
def damaged(tiny_store: PipelineConfig, tmp_path: Path) -> Path:
    """A writable copy of the session's tiny store."""
    copy = tmp_path / "features.zarr"
    shutil.copytree(tiny_store.data.store, copy)
    return copy


def test_good_store_passes_and_is_summarised(tiny_store, capsys):
    assert run_inspect(str(tiny_store.data.store)) == 0
    out = capsys.readouterr().out
    assert "48 steps" in out and "32 tokens" in out and "pm25" in out and out.rstrip().endswith("OK")


def test_config_covers_store_and_shard_set(tiny_store, tiny_shards, capsys):
    config = Path(tiny_store.data.store).parent / "tiny.yaml"
    assert run_inspect("--config", str(config)) == 0
    out = capsys.readouterr().out
    assert str(tiny_store.data.store) in out and str(tiny_shards) in out
    assert "shard version 2" in out and "input frames: input.npy" in out and "target frames: target.npy" in out
    assert "train: 24 samples in 6 shards, 44 frames (" in out and "x the dynamic fields of its 24 time steps" in out


def test_broken_scan_order_row_fails(damaged, capsys):
    order = zarr.open_group(str(damaged), mode="r+")["scan_order"]
    row = order[5]
    row[3] = row[4]  # a duplicate: no longer a permutation
    order[5] = row
    assert run_inspect(str(damaged)) == 1
    assert "scan_order: 1 row(s) are not permutations, first at time 2018-01-01T15" in capsys.readouterr().out


def test_order_disagreeing_with_sectors_fails(damaged, capsys):
    order = zarr.open_group(str(damaged), mode="r+")["scan_order_global"]
    order[7] = order[7][::-1]  # still a permutation, but not what the stored sector implies
    assert run_inspect(str(damaged)) == 1
    assert "scan_order_global: 1 row(s) disagree with the stored sectors" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("array", "value", "message"),
    [
        ("fields", np.nan, "fields hold NaN/inf on valid steps"),
        ("static", np.inf, "static holds NaN/inf"),
        ("static_std", 0.0, "static_std is zero for ['elevation']"),
        ("wind_speed", np.inf, "wind_speed holds NaN/inf on valid steps"),
        ("stats_std", np.nan, "stats_mean/stats_std missing or not finite"),
        ("stats_std", 0.0, "stats_std is zero for"),
        ("region_sector", 16, "region_sector outside -1..15"),
    ],
)
def test_bad_values_fail(damaged, capsys, array, value, message):
    arr = zarr.open_group(str(damaged), mode="r+")[array]
    index = (0,) * arr.ndim
    arr[index] = value
    assert run_inspect(str(damaged)) == 1
    assert message in capsys.readouterr().out


def test_unfinished_store_fails(damaged, capsys):
    zarr.open_group(str(damaged), mode="r+").attrs["build_state"] = "building"
    assert run_inspect(str(damaged)) == 1
    assert "not 'complete'" in capsys.readouterr().out


def test_missing_array_and_wrong_dtype_fail(damaged, capsys):
    group = zarr.open_group(str(damaged), mode="r+")
    del group["patch_elevation_std"]
    wind = group["wind_speed"][:]
    del group["wind_speed"]
    group.create_array("wind_speed", data=wind.astype(np.float64), dimension_names=("time", "token"))
    assert run_inspect(str(damaged)) == 1
    out = capsys.readouterr().out
    assert "'patch_elevation_std' is missing" in out and "'wind_speed' is ('time', 'token') float64" in out


def test_not_a_store_fails(tmp_path, capsys):
    assert run_inspect(str(tmp_path)) == 1
    assert "not a readable Zarr group" in capsys.readouterr().out
