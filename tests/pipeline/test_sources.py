"""Bring your own reanalysis: ERA5 / CAMS / CAQRA-style files (written by `pipeline.sample.conventions`,
which cites the real formats) read, normalised, regridded, converted and aligned in time.

Fields are linear in latitude, longitude and time, so bilinear regridding and time interpolation must
reproduce them exactly at the target cells: the tests compare numbers, not shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.build import build_features
from pipeline.config import PipelineConfig
from pipeline.sample import conventions
from pipeline.sample.write import point_axes
from pipeline.sources import describe_sources, read_block
from pipeline.sources.derived import G0, relative_humidity_from_dewpoint
from pipeline.sources.units import R_DRY
from pipeline.store import open_features
from topoflow.errors import SourceError

DOMAIN = {"lat_south": 30.0, "lon_west": 100.0, "resolution": 1.0, "n_lat": 8, "n_lon": 16}
START = pd.Timestamp("2018-01-31T00:00")


def linear(lat: np.ndarray, lon: np.ndarray, hours: np.ndarray, base: float, a: float = 0.5, b: float = 0.25,
           c: float = 0.1) -> np.ndarray:
    """base + a lat + b lon + c hours on a (t, lat, lon) grid: exact under bilinear regridding."""
    return (base + a * lat[None, :, None] + b * lon[None, None, :] + c * hours[:, None, None]).astype(np.float32)


def hours_of(times: pd.DatetimeIndex) -> np.ndarray:
    return ((times - START) / pd.Timedelta(hours=1)).to_numpy()


def era5_fields(lat: np.ndarray, lon: np.ndarray, times: pd.DatetimeIndex, offset: float = 0.0) -> dict:
    h = hours_of(times)
    return {"u10": linear(lat, lon, h, -30 + offset), "v10": linear(lat, lon, h, -40, b=0.1),
            "t2m": linear(lat, lon, h, 240, a=0.3, c=0.02), "d2m": linear(lat, lon, h, 230, a=0.3, c=0.02),
            "sp": linear(lat, lon, h, 90000, a=-50, b=20)}


def write_era5_months(root: Path, times: pd.DatetimeIndex, step: float = 1.0, **kwargs) -> None:
    lat, lon = point_axes(config(root).data.domain, step)
    for month, group in pd.Series(times, index=times).groupby(times.to_period("M")):
        idx = pd.DatetimeIndex(group.values)
        conventions.write_era5(root / "era5" / f"era5_{month}.nc", idx, lat, lon, era5_fields(lat, lon, idx), **kwargs)


ERA5_VARIABLES = {"u": "u10", "v": "v10", "temp": "t2m", "dewpoint": "d2m", "psfc": "sp"}
MET = [{"name": "u", "units": "m s-1"}, {"name": "v", "units": "m s-1"}, {"name": "temp", "units": "K"},
       {"name": "rh", "units": "%"}, {"name": "psfc", "units": "hPa"}]


def config(root: Path, sources: list[dict] | None = None, variables: list[dict] | None = None, days: float = 2,
           step: int = 3, targets: list[str] | None = None, **data) -> PipelineConfig:
    """A small multi-source recipe over 8 x 16 one-degree cells from START."""
    end = START + pd.Timedelta(hours=int(days * 24) - step)
    sources = sources if sources is not None else [
        {"name": "era5", "files": str(root / "era5" / "era5_*.nc"), "variables": ERA5_VARIABLES}]
    return PipelineConfig.model_validate({
        "data": {"store": str(root / "features.zarr"), "shards": str(root / "shards"), "domain": DOMAIN,
                 "step_hours": step, "sources": sources,
                 "derived": {"rh": {"formula": "relative_humidity_from_dewpoint",
                                    "args": {"temperature": "temp", "dewpoint": "dewpoint"}}},
                 "variables": variables or MET, "targets": targets or ["temp"], "leads_h": [step],
                 "regions": [2, 2], "splits": {"train": {"start": str(START), "end": str(end)}}, **data},
        "build": {"time_chunk": 8, "processes": False, "n_workers": 1}})


def centres(cfg: PipelineConfig) -> tuple[np.ndarray, np.ndarray]:
    return cfg.data.domain.latitudes(), cfg.data.domain.longitudes()


def test_era5_new_format_regridded_derived_and_converted_across_monthly_files(tmp_path):
    """valid_time, number, expver, descending latitude, ECMWF units, two monthly files, hourly -> 3-hourly."""
    times = pd.date_range(START, periods=60, freq="1h")  # Jan 31 + Feb 1: two monthly files
    write_era5_months(tmp_path, times)
    cfg = config(tmp_path)
    build_features(cfg, progress=False)
    ds, record = open_features(cfg.data.store)
    lat, lon = centres(cfg)
    want = era5_fields(lat, lon, cfg.data.times())
    f = {str(v): ds["fields"].sel(var=v).values for v in ds["var"].values}
    np.testing.assert_allclose(f["u"], want["u10"], atol=1e-4)
    np.testing.assert_allclose(f["temp"], want["t2m"], atol=1e-3)
    np.testing.assert_allclose(f["psfc"], want["sp"] / 100, rtol=1e-6)  # Pa -> hPa
    rh = relative_humidity_from_dewpoint(want["t2m"] - 273.15, want["d2m"] - 273.15)
    np.testing.assert_allclose(f["rh"], rh, rtol=1e-5)  # derived on the target grid, Magnus (WMO 2008)
    assert record.provenance.conversions == {"psfc": "Pa -> hPa"}
    assert [s.model_dump() for s in record.provenance.sources][0]["files"] == 2
    assert str(ds["var_long_name"].sel(var="u").values) == "10 metre U wind component"
    assert str(ds["var_standard_name"].sel(var="psfc").values) == "surface_air_pressure"
    assert str(ds["var_standard_name"].sel(var="u").values) == ""  # cfgrib writes "unknown": not kept


def test_overlapping_releases_keep_the_final_one_and_say_so(tmp_path, caplog):
    times = pd.date_range(START, periods=24, freq="1h")
    lat, lon = point_axes(config(tmp_path).data.domain, 1.0)
    conventions.write_era5(tmp_path / "era5" / "era5_a_t.nc", times[12:], lat, lon,
                           era5_fields(lat, lon, times[12:], offset=5.0), expver="0005")
    conventions.write_era5(tmp_path / "era5" / "era5_b_final.nc", times, lat, lon, era5_fields(lat, lon, times))
    cfg = config(tmp_path, days=1)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        found = describe_sources(cfg.data)
    assert "12 time(s) are in two releases; the final one (lowest expver) is kept" in caplog.text
    fields, valid, _ = read_block(found.plan, cfg.data.times().values)
    lat_c, lon_c = centres(cfg)
    np.testing.assert_allclose(fields[:, 0], era5_fields(lat_c, lon_c, cfg.data.times())["u10"], atol=1e-4)


def test_identical_duplicates_are_dropped_different_ones_name_both_files(tmp_path, caplog):
    times = pd.date_range(START, periods=24, freq="1h")
    lat, lon = point_axes(config(tmp_path).data.domain, 1.0)
    conventions.write_era5(tmp_path / "era5" / "era5_1.nc", times[:15], lat, lon, era5_fields(lat, lon, times[:15]))
    conventions.write_era5(tmp_path / "era5" / "era5_2.nc", times[10:], lat, lon, era5_fields(lat, lon, times[10:]))
    cfg = config(tmp_path, days=1)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        describe_sources(cfg.data)
    assert "5 duplicated time(s) with identical data dropped" in caplog.text
    conventions.write_era5(tmp_path / "era5" / "era5_2.nc", times[10:], lat, lon,
                           era5_fields(lat, lon, times[10:], offset=1.0))
    with pytest.raises(SourceError, match=r"2018-01-31T10:00 is in both .*era5_1.nc and .*era5_2.nc with different"):
        describe_sources(cfg.data)


def test_legacy_packed_int16_with_fill_values_and_an_expver_dim(tmp_path):
    """The old CDS format: `time`, int16 scale_factor/add_offset, _FillValue, ERA5 + ERA5T as an expver dim."""
    times = pd.date_range(START, periods=24, freq="1h")
    lat, lon = point_axes(config(tmp_path).data.domain, 1.0)
    conventions.write_era5_legacy(tmp_path / "era5" / "era5_old.nc", times, lat, lon, era5_fields(lat, lon, times),
                                  era5t_from=12)
    cfg = config(tmp_path, days=1)
    found = describe_sources(cfg.data)
    fields, valid, _ = read_block(found.plan, cfg.data.times().values)
    lat_c, lon_c = centres(cfg)
    want = era5_fields(lat_c, lon_c, cfg.data.times())
    assert valid.all()  # ERA5 for the first 12 h, ERA5T after: merged, no gap
    span = float(want["u10"].max() - want["u10"].min())
    np.testing.assert_allclose(fields[:, 0], want["u10"], atol=span / 65000 * 2)  # within the packing step


@pytest.mark.parametrize("convention", ["0..360", "-180..180"])
def test_longitudes_either_way_and_a_domain_across_the_seam(tmp_path, convention):
    """A global 3-degree CAMS-like grid, longitudes as the file has them; the domain spans 176 E .. 168 W."""
    lat = np.arange(90.0, -90.1, -3.0)
    lon = np.arange(0.0, 360.0, 3.0)
    if convention == "-180..180":
        lon = np.sort((lon + 180.0) % 360.0 - 180.0)
    times = pd.date_range(START, periods=16, freq="3h")
    unwrapped = (lon - 90.0) % 360.0  # continuous across 180, its only jump at 90 E, far from the domain
    values = {"pm2p5": linear(lat, unwrapped, hours_of(times), 1.0, a=0.01, b=0.02, c=0.0) * 1e-9}
    conventions.write_cams(tmp_path / "cams.nc", times, lat, lon, values)
    cfg = config(tmp_path, days=2, sources=[{"name": "cams", "files": str(tmp_path / "cams.nc"),
                                             "variables": {"pm25": "pm2p5"}}],
                 variables=[{"name": "pm25", "units": "ug m-3"}], targets=["pm25"], wind=["pm25", "pm25"],
                 domain={**DOMAIN, "lon_west": 176.0, "n_lon": 16}, derived={})
    found = describe_sources(cfg.data)
    fields, valid, _ = read_block(found.plan, cfg.data.times().values)
    lat_c, lon_c = centres(cfg)
    want = linear(lat_c, (lon_c - 90.0) % 360.0, hours_of(cfg.data.times()), 1.0, a=0.01, b=0.02, c=0.0)
    assert lon_c[-1] > 180 and valid.all()
    np.testing.assert_allclose(fields[:, 0], want, rtol=1e-5)  # kg m**-3 -> ug m-3, across the seam


def test_cams_gases_on_model_level_60_become_concentrations_with_the_air_density(tmp_path):
    """so2 as kg kg**-1 on model_level 60 -> ug m-3 with rho = sp / (R_d t2m) from ERA5, same time and place."""
    times = pd.date_range(START, periods=48, freq="1h")
    write_era5_months(tmp_path, times)
    lat, lon = point_axes(config(tmp_path).data.domain, 1.5)
    cams_times = times[::3]
    ratio = linear(lat, lon, hours_of(cams_times), 5e-9, a=1e-11, b=2e-11, c=1e-12)
    conventions.write_cams(tmp_path / "cams" / "cams.nc", cams_times, lat, lon, {"so2": ratio})
    sources = [{"name": "era5", "files": str(tmp_path / "era5" / "era5_*.nc"), "variables": ERA5_VARIABLES},
               {"name": "cams", "files": str(tmp_path / "cams" / "cams.nc"),
                "variables": {"so2": {"var": "so2", "select": {"model_level": 60}}}}]
    cfg = config(tmp_path, days=2, sources=sources, variables=[*MET, {"name": "so2", "units": "ug m-3"}],
                 air_density={"pressure": "psfc", "temperature": "temp"})
    found = describe_sources(cfg.data)
    assert found.plan.conversions["so2"].density
    fields, valid, _ = read_block(found.plan, cfg.data.times().values)
    lat_c, lon_c = centres(cfg)
    h = hours_of(cfg.data.times())
    met = era5_fields(lat_c, lon_c, cfg.data.times())
    rho = met["sp"].astype(np.float64) / (R_DRY * met["t2m"])
    want = linear(lat_c, lon_c, h, 5e-9, a=1e-11, b=2e-11, c=1e-12) * rho * 1e9
    np.testing.assert_allclose(fields[:, -1], want, rtol=1e-5)
    without = cfg.data.model_copy(update={"air_density": None})
    with pytest.raises(SourceError, match=r"'so2': converting 'kg kg\*\*-1' to 'ug m-3' needs the air density"):
        describe_sources(without)


def caqra_grid(step: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """A rotated ~25 km grid around the domain (2-D lat/lon, as CAQRA's projected grid)."""
    y, x = np.meshgrid(np.arange(48), np.arange(88), indexing="ij")
    lat2d = 28.5 + step * y + 0.02 * x
    lon2d = 98.0 + step * x - 0.02 * y
    return lat2d, lon2d


def caqra_config(tmp_path: Path, regrid: str) -> PipelineConfig:
    return config(tmp_path, days=1, step=1,
                  sources=[{"name": "caqra", "files": str(tmp_path / "caqra" / "CN-Reanalysis*.nc"),
                            "variables": {"pm25": "pm25"}, "regrid": regrid,
                            "filename_time": "CN-Reanalysis%Y%m%d%H.nc", "utc_offset_hours": 8}],
                  variables=[{"name": "pm25", "units": "ug m-3"}], targets=["pm25"], wind=["pm25", "pm25"],
                  derived={})


@pytest.mark.parametrize(("regrid", "tolerance"), [("bilinear", 0.01), ("nearest", 0.2), ("conservative", 0.05)])
def test_curvilinear_caqra_files_through_pyresample(tmp_path, regrid, tolerance):
    """One file per hour named in Beijing time, 2-D lat2d/lon2d, a leading singleton axis: regridded
    by pyresample (bucket average for conservative); the field is linear, so errors stay small."""
    times = pd.date_range(START, periods=24, freq="1h")
    lat2d, lon2d = caqra_grid()
    h = hours_of(times)[:, None, None]
    conventions.write_caqra(tmp_path / "caqra", times, lat2d, lon2d, {"pm25": 50 + 2 * lat2d + lon2d + 0.5 * h})
    assert (tmp_path / "caqra" / "CN-Reanalysis2018013108.nc").exists()  # 00 UTC = 08 Beijing time
    cfg = caqra_config(tmp_path, regrid)
    found = describe_sources(cfg.data)
    fields, valid, _ = read_block(found.plan, cfg.data.times().values)
    lat_c, lon_c = centres(cfg)
    want = 50 + 2 * lat_c[None, :, None] + lon_c[None, None, :] + 0.5 * hours_of(cfg.data.times())[:, None, None]
    assert valid.all()
    assert np.abs(fields[:, 0] - want).max() < tolerance * (want.max() - want.min())


def test_a_curvilinear_file_without_2d_coordinates_is_named(tmp_path):
    times = pd.date_range(START, periods=2, freq="1h")
    lat2d, lon2d = caqra_grid()
    paths = conventions.write_caqra(tmp_path / "caqra", times, lat2d, lon2d, {"pm25": np.ones((2, *lat2d.shape))})
    import xarray as xr

    ds = xr.open_dataset(paths[0]).load().drop_vars(["lat2d", "lon2d"])
    ds.to_netcdf(paths[0].with_suffix(".tmp"))
    paths[0].with_suffix(".tmp").replace(paths[0])
    with pytest.raises(SourceError, match=r"CN-Reanalysis2018013108.nc has no latitude coordinate.*2-D latitude"):
        describe_sources(caqra_config(tmp_path, "bilinear").data)


def test_conservative_regridding_keeps_each_target_cells_mean(tmp_path):
    """A 0.25-degree field constant within each target cell comes back exactly (cos-lat weighted means)."""
    population = {"name": "pop", "files": str(tmp_path / "pop.nc"), "variables": {"population": "population_density"},
                  "regrid": "conservative", "fill": 0}
    cfg = config(tmp_path, days=1, sources=[config(tmp_path).data.sources[0].model_dump(), population],
                 variables=[*MET, {"name": "population", "units": "km-2", "kind": "static"}])
    write_era5_months(tmp_path, pd.date_range(START, periods=24, freq="1h"))
    cells = np.random.default_rng(0).uniform(1, 500, size=(8, 16))
    cells[0, :3] = np.nan  # sea: the raster's fill value
    fine = np.repeat(np.repeat(cells, 4, 0), 4, 1)[::-1]
    lat = 30.125 + 0.25 * np.arange(32)
    lon = 100.125 + 0.25 * np.arange(64)
    conventions.write_density(tmp_path / "pop.nc", lat[::-1], lon, fine)
    found = describe_sources(cfg.data)
    got = found.static[0]
    np.testing.assert_allclose(got[np.isfinite(cells)], cells[np.isfinite(cells)], rtol=1e-5)
    assert (got[0, :3] == 0).all()  # the fill value became 0 (logged)


def test_coarser_steps_are_gaps_unless_interpolation_is_allowed_and_recorded(tmp_path):
    """A 3-hourly source in an hourly store: two of three steps are gaps, or interpolated (exact: linear)."""
    times = pd.date_range(START, periods=48, freq="3h")
    write_era5_months(tmp_path, times)
    cfg = config(tmp_path, days=2, step=1)
    assert len(describe_sources(cfg.data).missing_times) == 2 * (len(cfg.data.times()) // 3)
    filled = config(tmp_path, days=2, step=1, gaps={"interpolate_max_hours": 3})
    found = describe_sources(filled.data)
    assert found.missing_times == [] and len(found.filled_times) == 2 * (len(filled.data.times()) // 3)
    assert found.filled_times[0] == "2018-01-31T01:00:00"
    fields, valid, interpolated = read_block(found.plan, filled.data.times().values)
    lat_c, lon_c = centres(filled)
    np.testing.assert_allclose(fields[:, 0], era5_fields(lat_c, lon_c, filled.data.times())["u10"], atol=1e-4)
    assert valid.all() and interpolated[1] and not interpolated[3]


def test_statics_elevation_from_geopotential_or_the_embedded_dem(tmp_path):
    write_era5_months(tmp_path, pd.date_range(START, periods=24, freq="1h"))
    lat, lon = point_axes(config(tmp_path).data.domain, 1.0)
    height = linear(lat, lon, np.zeros(1), 500.0, a=20.0, b=10.0, c=0.0)[0]
    land = (lon[None, :] < 110).astype(np.float32) * np.ones_like(height)
    conventions.write_era5_invariant(tmp_path / "invariant.nc", START, lat, lon, height * G0, land)
    invariant = {"name": "invariant", "files": str(tmp_path / "invariant.nc"),
                 "variables": {"geopotential": "z", "land_sea": "lsm"}}
    cfg = config(tmp_path, days=1, sources=[config(tmp_path).data.sources[0].model_dump(), invariant],
                 derived={**config(tmp_path).data.model_dump()["derived"],
                          "elevation": {"formula": "height_from_geopotential", "args": {"geopotential": "geopotential"}}},
                 static={"elevation": "elevation", "loss_mask": {"variable": "land_sea", "threshold": 0.5}})
    found = describe_sources(cfg.data)
    lat_c, lon_c = centres(cfg)
    np.testing.assert_allclose(found.elevation, linear(lat_c, lon_c, np.zeros(1), 500.0, a=20.0, b=10.0, c=0.0)[0],
                               rtol=1e-5)
    assert found.loss_mask[:, lon_c < 109.5].all() and not found.loss_mask[:, lon_c > 110.5].any()
    default = describe_sources(config(tmp_path, days=1).data)  # no static source: the embedded DEM, every cell
    assert default.elevation.max() > 1000 and default.loss_mask.all()


def test_a_source_that_does_not_cover_the_domain_names_the_edge(tmp_path):
    times = pd.date_range(START, periods=24, freq="1h")
    lat, lon = point_axes(config(tmp_path).data.domain, 1.0)
    conventions.write_era5(tmp_path / "era5" / "era5_small.nc", times, lat, lon[lon <= 110],
                           era5_fields(lat, lon[lon <= 110], times))
    with pytest.raises(SourceError, match=r"'era5': east edge 115.5 E of data.domain is beyond the files' 110 E"):
        build_features(config(tmp_path, days=1), progress=False)
    assert not (tmp_path / "features.zarr").exists() and not (tmp_path / "features.zarr.partial").exists()


def test_a_source_that_does_not_cover_the_period_names_both_spans(tmp_path):
    write_era5_months(tmp_path, pd.date_range(START, periods=24, freq="1h"))
    with pytest.raises(SourceError, match=r"'era5' covers 2018-01-31T00:00 .. 2018-01-31T23:00 but the store needs "
                                          r"2018-01-31T00:00 .. 2018-02-01T21:00"):
        build_features(config(tmp_path, days=2), progress=False)
    assert not (tmp_path / "features.zarr").exists()


def test_one_file_of_a_glob_lacking_a_variable_or_on_another_grid_is_named(tmp_path):
    times = pd.date_range(START, periods=48, freq="1h")
    write_era5_months(tmp_path, times)
    lat, lon = point_axes(config(tmp_path).data.domain, 1.0)
    feb = tmp_path / "era5" / "era5_2018-02.nc"
    fields = era5_fields(lat, lon, times[24:])
    del fields["d2m"]
    conventions.write_era5(feb, times[24:], lat, lon, fields)
    with pytest.raises(SourceError, match=r"'era5': .*era5_2018-02.nc lacks 'd2m' \(for 'dewpoint'\)"):
        describe_sources(config(tmp_path).data)
    conventions.write_era5(feb, times[24:], lat + 0.5, lon, era5_fields(lat, lon, times[24:]))
    with pytest.raises(SourceError, match=r"era5_2018-02.nc is on another grid .* every file of one source"):
        describe_sources(config(tmp_path).data)


def test_an_all_nan_field_is_named_with_its_time_and_nothing_is_finished(tmp_path):
    times = pd.date_range(START, periods=48, freq="1h")
    lat, lon = point_axes(config(tmp_path).data.domain, 1.0)
    fields = era5_fields(lat, lon, times)
    fields["t2m"][30] = np.nan
    conventions.write_era5(tmp_path / "era5" / "era5_all.nc", times, lat, lon, fields)
    cfg = config(tmp_path)
    with pytest.raises(SourceError, match=r"'temp' \(from 'temp'\) has missing values .* first at 2018-02-01T06:00"):
        build_features(cfg, progress=False)
    assert not Path(cfg.data.store).exists()


def test_unreadable_units_and_unknown_recipe_names_are_clear(tmp_path):
    times = pd.date_range(START, periods=48, freq="1h")
    lat, lon = point_axes(config(tmp_path).data.domain, 1.0)
    conventions.write_era5(tmp_path / "era5" / "era5_all.nc", times, lat, lon, era5_fields(lat, lon, times))
    import h5py

    with h5py.File(tmp_path / "era5" / "era5_all.nc", "r+") as f:
        f["sp"].attrs["units"] = "zorkmids"
    with pytest.raises(SourceError, match=r"units 'zorkmids' cannot be read"):
        describe_sources(config(tmp_path).data)
    with pytest.raises(ValueError, match=r"variables \[\"rh \(from 'humidity'\)\"\] come from no source"):
        config(tmp_path, variables=[*MET[:3], {"name": "rh", "units": "%", "source": "humidity"}, MET[4]])
