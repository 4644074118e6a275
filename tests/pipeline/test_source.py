"""Bad sources get a clear error naming the variable/file and the fix, and leave no finished store;
gaps in a source become `valid` False, never silently filled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline.build import build_features
from pipeline.config import PipelineConfig, load_pipeline_config
from pipeline.source import describe_source, read_block
from pipeline.store import open_features, partial_path, read_record
from tests.helpers import tiny_raw_config, write_config
from topoflow.errors import ConfigError, SourceError


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
        describe_source(tiny_config)


def test_missing_time_dim_named(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.isel(time=0, drop=True))
    with pytest.raises(SourceError, match=r"no 'time' dim.*rename"):
        describe_source(tiny_config)


def test_units_differing_from_config(tiny_config, tiny_source):
    def hpa(ds):
        ds["sp"].attrs["units"] = "hPa"
    corrupt(tiny_config, tiny_source, hpa)
    with pytest.raises(SourceError, match=r"'psfc'.*declared.*'Pa'.*found 'hPa'.*convert"):
        describe_source(tiny_config)


def test_grid_not_matching_domain(tiny_config, tiny_source):
    tiny_config.data.domain.lat_south = 31.0
    with pytest.raises(SourceError, match=r"does not match data.domain.*lat_south=30"):
        describe_source(tiny_config)


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
    assert read_record(partial_path(cfg.data.store)).build_state == "building"


def test_nan_in_static_field(tiny_config, tiny_source):
    def hole(ds):
        ds["orography"][0, 0] = np.nan
    corrupt(tiny_config, tiny_source, hole)
    with pytest.raises(SourceError, match=r"static variable 'elevation' contains NaN"):
        describe_source(tiny_config)


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
        describe_source(tiny_config)


def test_time_step_off_the_store_step(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.assign_coords(time=ds.time + np.timedelta64(1, "h") *
                                                                  (np.arange(ds.sizes["time"]) % 2)))
    with pytest.raises(SourceError, match=r"time steps.*not multiples of data.step_hours=3"):
        describe_source(tiny_config)


def test_missing_times_are_gaps_marked_invalid_never_filled(tmp_path, tiny_source):
    raw = tiny_raw_config(tmp_path)
    raw["build"].update(processes=False)
    cfg = load_pipeline_config(write_config(raw, tmp_path / "tiny.yaml"))
    corrupt(cfg, tiny_source, lambda ds: ds.drop_isel(time=[5, 6, 30]))
    build_features(cfg, progress=False)
    ds, record = open_features(cfg.data.store)
    assert ds.sizes["time"] == 48 and np.flatnonzero(~ds["valid"].values).tolist() == [5, 6, 30]
    assert record.missing_times == ["2018-01-01T15:00:00", "2018-01-01T18:00:00", "2018-01-04T18:00:00"]
    assert np.isnan(ds["fields"].values[[5, 6, 30]]).all()
    assert np.isfinite(np.delete(ds["fields"].values, [5, 6, 30], axis=0)).all()
    train = np.delete(tiny_source["u10"].values[:24], [5, 6], axis=0).astype(np.float64)  # stats skip the gaps
    assert float(ds["stats_mean"].sel(var="u")) == pytest.approx(train.mean(), rel=1e-9)
    assert (ds["region_sector"].values[[5, 6, 30]] == -1).all()  # gaps scan in raster order, no NaN sectors


def test_missing_loss_mask(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.drop_vars("lsm"))
    with pytest.raises(SourceError, match=r"loss mask 'lsm'.*loss_mask: null"):
        describe_source(tiny_config)


def test_blocks_read_latitude_ascending_in_the_configs_variable_order(tiny_config, tiny_source):
    found = describe_source(tiny_config)
    np.testing.assert_array_equal(found.static[0], tiny_source["orography"].values[::-1])
    assert [v.name for v in found.variables] == tiny_config.data.variable_names
    times = tiny_config.data.times().values[4:9]
    fields, valid = read_block(tiny_config, times)
    assert valid.all() and fields.shape == (5, 11, 8, 16)
    temp = tiny_config.data.dynamic_names.index("temp")
    np.testing.assert_array_equal(fields[:, temp], tiny_source["t2m"].values[4:9, ::-1])
