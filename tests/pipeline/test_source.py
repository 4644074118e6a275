"""A prepared source (one file on the target grid, `regrid: none`): bad inputs get a clear error naming
the variable or file and the fix, and leave no finished store; gaps become `valid` False."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline.build import build_features
from pipeline.config import PipelineConfig, load_pipeline_config
from pipeline.sources import describe_sources, read_block
from pipeline.store import open_features, partial_path, read_record
from tests.helpers import source_path, tiny_raw_config, write_config
from topoflow.errors import ConfigError, SourceError


def corrupt(cfg: PipelineConfig, source: xr.Dataset, change) -> None:  # noqa: ANN001 - change edits a Dataset
    """Rewrite the prepared file as `change(copy of the good source)`."""
    ds = source.copy(deep=True)
    ds = change(ds) or ds
    ds.to_netcdf(source_path(cfg), engine="h5netcdf")


def in_process(tmp_path: Path, **build) -> PipelineConfig:
    raw = tiny_raw_config(tmp_path)
    raw["build"].update(processes=False, **build)
    return load_pipeline_config(write_config(raw, tmp_path / "tiny.yaml"))


def test_missing_variable_lists_what_exists(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.drop_vars("t2m"))
    with pytest.raises(SourceError, match=r"'prepared'.*raw.nc lacks 't2m' \(for 'temp'\).*holds \[.*'u10'.*\]"):
        build_features(tiny_config, progress=False)
    assert not Path(tiny_config.data.store).exists()


def test_extra_dims_need_a_selection(tiny_config, tiny_source):
    def add_level(ds):
        ds["sp"] = ds["sp"].expand_dims(level=[1000, 850], axis=1)
    corrupt(tiny_config, tiny_source, add_level)
    found = describe_sources(tiny_config.data)
    with pytest.raises(SourceError, match=r"'sp' keeps the dims \['level'\] after `select`.*select one value"):
        read_block(found.plan, tiny_config.data.times().values[:2])


def test_units_are_converted_not_compared(tiny_config, tiny_source):
    def hpa(ds):
        ds["sp"] = ds["sp"] / 100
        ds["sp"].attrs["units"] = "hPa"
    corrupt(tiny_config, tiny_source, hpa)
    found = describe_sources(tiny_config.data)
    fields, valid, _ = read_block(found.plan, tiny_config.data.times().values[:3])
    psfc = tiny_config.data.dynamic_names.index("psfc")
    np.testing.assert_allclose(fields[:, psfc], tiny_source["sp"].values[:3, ::-1], rtol=1e-6)


def test_unconvertible_units_name_both(tiny_config, tiny_source):
    def kelvin(ds):
        ds["sp"].attrs["units"] = "K"
    corrupt(tiny_config, tiny_source, kelvin)
    with pytest.raises(SourceError, match=r"'psfc'.*cannot convert 'K' to 'Pa'"):
        describe_sources(tiny_config.data)


def test_grid_not_matching_domain_with_regrid_none(tiny_config, tiny_source):
    tiny_config.data.domain.lat_south = 31.0
    with pytest.raises(SourceError, match=r"'prepared' has regrid: none but its grid.*set a regrid method"):
        describe_sources(tiny_config.data)


def test_grid_not_divisible_by_patch_times_regions(tmp_path):
    raw = tiny_raw_config(tmp_path)
    raw["data"]["regions"] = [3, 2]
    with pytest.raises(ConfigError, match=r"patch grid 4x8.*not divisible by regions 3x2"):
        load_pipeline_config(write_config(raw, tmp_path / "bad.yaml"))
    raw["data"]["patch_size"] = 3
    with pytest.raises(ConfigError, match=r"not divisible by patch_size 3"):
        load_pipeline_config(write_config(raw, tmp_path / "bad.yaml"))


def test_nan_in_dynamic_field_names_variable_and_first_time(tmp_path, tiny_source):
    cfg = in_process(tmp_path, time_chunk=24)  # NaNs in both blocks: the earlier one is reported

    def holes(ds):
        ds["no2"][40, 2, 3] = np.nan
        ds["no2"][20, 1, 1] = np.nan
    corrupt(cfg, tiny_source, holes)
    with pytest.raises(SourceError, match=r"'no2' \(from 'no2'\) has missing values.*first at 2018-01-03T12:00"):
        build_features(cfg, progress=False)
    assert not Path(cfg.data.store).exists()
    assert read_record(partial_path(cfg.data.store)).build_state == "building"


def test_nan_in_static_field_names_the_fix(tiny_config, tiny_source):
    def hole(ds):
        ds["orography"][0, 0] = np.nan
    corrupt(tiny_config, tiny_source, hole)
    with pytest.raises(SourceError, match=r"static variable 'elevation' has 1 missing cell.*set the source's `fill`"):
        describe_sources(tiny_config.data)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_file_named(tiny_config, tiny_source, damage):
    path = source_path(tiny_config)
    data = path.read_bytes()
    path.write_bytes(b"this is not netcdf" * 100 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(SourceError, match=rf"(?s){path}.*unreadable or corrupt.*re-download"):
        build_features(tiny_config, progress=False)
    assert not Path(tiny_config.data.store).exists()


def test_missing_file_named(tiny_config):
    with pytest.raises(SourceError, match=rf"{source_path(tiny_config)} does not exist"):
        describe_sources(tiny_config.data)


def test_time_step_off_the_store_step_is_a_gap(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.assign_coords(time=ds.time + np.timedelta64(1, "h") *
                                                                  (np.arange(ds.sizes["time"]) % 2)))
    found = describe_sources(tiny_config.data)
    assert len(found.missing_times) == 24  # every other step is at hh+1 and never matches a store time


def test_missing_times_are_gaps_marked_invalid_never_filled(tmp_path, tiny_source):
    cfg = in_process(tmp_path)
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


def test_missing_loss_mask_variable(tiny_config, tiny_source):
    corrupt(tiny_config, tiny_source, lambda ds: ds.drop_vars("lsm"))
    with pytest.raises(SourceError, match=r"'prepared_static'.*lacks 'lsm' \(for 'land_sea'\)"):
        describe_sources(tiny_config.data)


def test_blocks_read_latitude_ascending_in_the_configs_variable_order(tiny_config, tiny_source):
    found = describe_sources(tiny_config.data)
    np.testing.assert_array_equal(found.static[0], tiny_source["orography"].values[::-1])
    assert [v.name for v in found.variables] == tiny_config.data.variable_names
    times = tiny_config.data.times().values[4:9]
    fields, valid, _ = read_block(found.plan, times)
    assert valid.all() and fields.shape == (5, 11, 8, 16)
    temp = tiny_config.data.dynamic_names.index("temp")
    np.testing.assert_array_equal(fields[:, temp], tiny_source["t2m"].values[4:9, ::-1])
