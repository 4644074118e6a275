"""Every bad input of issue 2 item 6: a clear error naming the variable/file and the fix, no finished store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import tiny_raw_config, write_config
from pipeline.build import build_features
from pipeline.config import ConfigError, PipelineConfig, load_pipeline_config
from pipeline.source import SourceError, open_source
from pipeline.store import partial_path


def corrupt(cfg: PipelineConfig, source: xr.Dataset, change) -> None:  # noqa: ANN001 - change edits a Dataset
    """Rewrite cfg.data.raw as `change(copy of the good source)`."""
    ds = source.copy(deep=True)
    ds = change(ds) or ds
    ds.to_netcdf(cfg.data.raw, engine="h5netcdf")


def assert_nothing_finished(cfg: PipelineConfig) -> None:
    assert not Path(cfg.data.store).exists()


def test_missing_variable_lists_what_exists(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.drop_vars("t2m"))
    with pytest.raises(SourceError, match=r"'temp'.*'t2m' is missing.*holds \[.*'u10'.*\].*`source:`"):
        build_features(tiny_config, progress=False)
    assert_nothing_finished(tiny_config)


def test_wrong_dims_named(tiny_config, tiny_source):
    def add_level(ds):
        ds["sp"] = ds["sp"].expand_dims(level=[1000])
    corrupt(tiny_config, tiny_source, add_level)
    with pytest.raises(SourceError, match=r"'psfc'.*'sp'.*dims.*level.*expected \('time', 'latitude', 'longitude'\)"):
        open_source(tiny_config)


def test_missing_time_dim_named(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.isel(time=0, drop=True))
    with pytest.raises(SourceError, match=r"no 'time' dim.*rename"):
        open_source(tiny_config)


def test_units_differing_from_config(tiny_config, tiny_source):
    def hpa(ds):
        ds["sp"].attrs["units"] = "hPa"
    corrupt(tiny_config, tiny_source, hpa)
    with pytest.raises(SourceError, match=r"'psfc'.*declared.*'Pa'.*found 'hPa'.*convert"):
        open_source(tiny_config)


def test_grid_not_matching_domain(tiny_config, tiny_source):
    tiny_config.data.domain.lat_south = 31.0
    with pytest.raises(SourceError, match=r"does not match data.domain.*lat_south=30"):
        open_source(tiny_config)


def test_grid_not_divisible_by_patch_times_regions(tmp_path):
    raw = tiny_raw_config(tmp_path)
    raw["data"]["regions"] = [3, 2]
    with pytest.raises(ConfigError, match=r"patch grid 4x8.*not divisible by regions 3x2"):
        load_pipeline_config(write_config(raw, tmp_path / "bad.yaml"))
    raw["data"]["patch_size"] = 3
    with pytest.raises(ConfigError, match=r"not divisible by patch_size 3"):
        load_pipeline_config(write_config(raw, tmp_path / "bad.yaml"))


def test_nan_in_dynamic_field_names_variable_and_first_time(tmp_path, tiny_source):
    raw = tiny_raw_config(tmp_path)
    raw["build"].update(processes=False, time_chunk=24)  # NaNs in both blocks: the earlier one is reported
    cfg = load_pipeline_config(write_config(raw, tmp_path / "tiny.yaml"))

    def holes(ds):
        ds["no2"][40, 2, 3] = np.nan
        ds["no2"][20, 1, 1] = np.nan
    corrupt(cfg, tiny_source, holes)
    with pytest.raises(SourceError, match=r"'no2' contains NaN.*first at time 2018-01-03 12:00"):
        build_features(cfg, progress=False)
    assert_nothing_finished(cfg)
    assert zarr.open_group(str(partial_path(cfg.data.store))).attrs["build_state"] == "building"


def test_nan_in_static_field(tiny_config, tiny_source):
    def hole(ds):
        ds["orography"][0, 0] = np.nan
    corrupt(tiny_config, tiny_source, hole)
    with pytest.raises(SourceError, match=r"static variable 'elevation' contains NaN"):
        open_source(tiny_config)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_file_named(tiny_config, tiny_source, damage):
    path = Path(tiny_config.data.raw)
    data = path.read_bytes()
    path.write_bytes(b"this is not netcdf" * 100 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(SourceError, match=rf"(?s){path}.*unreadable or corrupt.*regenerate"):
        build_features(tiny_config, progress=False)
    assert_nothing_finished(tiny_config)


def test_missing_file_named(tiny_config):
    with pytest.raises(SourceError, match=rf"{tiny_config.data.raw} does not exist.*pipeline sample"):
        open_source(tiny_config)


def test_irregular_time_step(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.isel(time=[0, 1, 3, 4]))
    with pytest.raises(SourceError, match=r"time steps.*step_hours=3"):
        open_source(tiny_config)


def test_missing_loss_mask(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.drop_vars("lsm"))
    with pytest.raises(SourceError, match=r"loss mask 'lsm'.*loss_mask: null"):
        open_source(tiny_config)


def test_valid_source_opens_ascending_with_model_names(tiny_config, tiny_source):
    with open_source(tiny_config) as src:
        assert (np.diff(src["lat"].values) > 0).all()
        np.testing.assert_array_equal(src["temp"].values, tiny_source["t2m"].values[:, ::-1])
        assert src["temp"].dims == ("time", "lat", "lon")
