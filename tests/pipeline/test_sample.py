"""The embedded sample: real terrain, files in the real downloads' conventions, determinism, physical sanity
of what the build makes of them, and the simulator's physics (terrain barrier)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.__main__ import main
from pipeline.build import build_features
from pipeline.config import DomainConfig, PipelineConfig, load_pipeline_config
from pipeline.sample.simulate import Grid, barometric_pressure, deflect_by_terrain, transport
from pipeline.sample.write import MANIFEST, SampleError, write_sample
from pipeline.sources import describe_sources
from pipeline.sources.dem import altitude_file, regrid_elevation
from pipeline.sources.derived import saturation_vapour_pressure
from pipeline.store import open_features
from tests.helpers import demo_config

DEMO = DomainConfig(lat_south=15.0, lon_west=70.0, resolution=1.0, n_lat=32, n_lon=64)
TINY = DomainConfig(lat_south=30.0, lon_west=100.0, resolution=1.0, n_lat=8, n_lon=16)


def _cell(domain: DomainConfig, field: np.ndarray, lat: float, lon: float) -> float:
    i = int(np.argmin(np.abs(np.array(domain.latitudes()) - lat)))
    j = int(np.argmin(np.abs(np.array(domain.longitudes()) - lon)))
    return float(field[i, j])


def _config(tmp_path: Path, domain: DomainConfig = TINY, days: int = 3, **sample) -> PipelineConfig:
    return load_pipeline_config(demo_config(tmp_path, domain, days, sample=sample))


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    """The demo recipe's sample on 8x16 cells over 30-38 N, 100-116 E, three days."""
    cfg = _config(tmp_path_factory.mktemp("sample"))
    write_sample(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def demo_winter(tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    """Ten winter days of the demo domain (32x64 over China), built from the sample's files, 6-hourly."""
    root = tmp_path_factory.mktemp("demo")
    cfg = _config(root, DEMO, 10, seed=0)
    write_sample(cfg, progress=False)
    build_features(cfg, progress=False)
    ds, _ = open_features(cfg.data.store)
    return ds.load()


def test_files_follow_the_downloads_conventions(tiny_sample):
    root = Path(tiny_sample.data.sample.dir)
    era5 = xr.open_dataset(root / "era5" / "era5_single_levels_2018-01.nc", decode_times=False)
    assert era5["u10"].dims == ("valid_time", "latitude", "longitude") and era5["u10"].dtype == np.float32
    assert era5["valid_time"].attrs["units"] == "seconds since 1970-01-01" and era5["valid_time"].dtype == np.int64
    assert np.diff(era5["valid_time"].values).tolist() == [3600] * (era5.sizes["valid_time"] - 1)  # hourly
    assert (np.diff(era5.latitude) < 0).all() and era5.latitude.attrs["stored_direction"] == "decreasing"
    assert era5["number"].dims == () and era5["expver"].dims == ("valid_time",)
    assert {str(v) for v in era5["expver"].values} == {"0005"}  # the last month is ERA5T
    units = {v: era5[v].attrs["units"] for v in era5.data_vars}
    assert units == {"u10": "m s**-1", "v10": "m s**-1", "t2m": "K", "d2m": "K", "sp": "Pa"}
    assert (era5["d2m"] <= era5["t2m"] + 1e-3).all()  # dewpoint never above the temperature
    cams = xr.open_dataset(root / "cams" / "cams_eac4_2018-01.nc")
    assert cams["so2"].dims == ("valid_time", "model_level", "latitude", "longitude")
    assert cams["model_level"].values.tolist() == [60.0] and cams["pm2p5"].attrs["units"] == "kg m**-3"
    assert cams["go3"].attrs["units"] == "kg kg**-1" and float(cams["go3"].max()) < 1e-6  # a mixing ratio
    assert set(np.diff(cams["valid_time"].values).astype("timedelta64[h]").astype(int).tolist()) == {3}
    assert np.diff(cams.longitude).min() == pytest.approx(1.5)
    invariant = xr.open_dataset(root / "era5" / "era5_invariant.nc")
    assert invariant.sizes["valid_time"] == 1 and invariant["z"].attrs["units"] == "m**2 s**-2"
    assert invariant["lsm"].attrs["units"] == "(0 - 1)"
    with h5py.File(root / "population" / "population_density.nc") as f:
        assert f["population_density"].attrs["_FillValue"] == -9999.0
    found = describe_sources(tiny_sample.data)  # the build's own checks accept them
    assert found.missing_times == [] and found.loss_mask.dtype == bool


def test_deterministic_and_seeded(tiny_sample, tmp_path):
    again = _config(tmp_path / "a")
    other = _config(tmp_path / "b", seed=7)
    for cfg in (again, other):
        write_sample(cfg, progress=False)
    name = Path("cams") / "cams_eac4_2018-01.nc"
    a, b, c = (xr.open_dataset(Path(cfg.data.sample.dir) / name) for cfg in (tiny_sample, again, other))
    for var in a.data_vars:
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
    assert not np.array_equal(a["pm2p5"].values, c["pm2p5"].values)
    z = [xr.open_dataset(Path(cfg.data.sample.dir) / "era5" / "era5_invariant.nc")["z"].values for cfg in (again, other)]
    np.testing.assert_array_equal(*z)  # terrain is not random


def test_skip_overwrite_and_refuse(tmp_path, capsys):
    cfg = _config(tmp_path)
    root = write_sample(cfg, progress=False)
    stamp = (root / MANIFEST).stat().st_mtime_ns
    assert write_sample(cfg, progress=False) == root and (root / MANIFEST).stat().st_mtime_ns == stamp
    assert "up to date" in capsys.readouterr().out
    write_sample(cfg, overwrite=True, progress=False)
    assert (root / MANIFEST).stat().st_mtime_ns != stamp
    write_sample(_config(tmp_path, seed=5), progress=False)  # same folder, another config: regenerated
    assert "another config" in capsys.readouterr().out
    assert not list(root.rglob(".*.tmp"))  # no temporary left behind
    foreign = tmp_path / "theirs"
    (foreign / "era5").mkdir(parents=True)
    (foreign / "era5" / "download.nc").write_bytes(b"somebody's reanalysis")
    theirs = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "sample": cfg.data.sample.model_copy(update={"dir": foreign})})})
    with pytest.raises(SampleError, match="not written by `pipeline sample`"):
        write_sample(theirs, progress=False)
    assert (foreign / "era5" / "download.nc").read_bytes() == b"somebody's reanalysis"


def test_cli_set_overrides(tmp_path, capsys):
    config = demo_config(tmp_path, TINY, 2)
    args = ["sample", "--config", str(config), "--set", "data.sample.seed=3", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out


def test_the_built_sample_is_physically_sane(demo_winter):
    """What the build makes of the sample's ERA5/CAMS-like files: regridded, RH derived from the dewpoint,
    mixing ratios turned into concentrations with the air density."""
    ds = demo_winter
    f = {str(v): ds["fields"].sel(var=v).values for v in ds["var"].values}
    z = ds["elevation"].values
    land = ds["loss_mask"].values
    pop = ds["static"].sel(static_var="population").values
    for name in ("pm25", "pm10", "so2", "no2", "co", "o3"):
        assert np.isfinite(f[name]).all() and (f[name] > 0).all(), name
    assert (f["pm25"] <= f["pm10"] * 1.02 + 1e-3).all()  # PM2.5 is part of PM10 (up to interpolation)
    assert ((f["rh"] > 0) & (f["rh"] <= 100.5)).all()
    plateau, plains = z > 4000, (z < 200) & (pop > 300) & land
    assert plateau.sum() > 20 and plains.sum() > 10
    pm = f["pm25"].mean(0)
    assert pm[plains].mean() > 4 * pm[plateau].mean()  # emissions from low populated land, blocked uphill
    assert 30 < pm[plains].mean() < 400  # tens to a few hundred ug/m3 in the winter plains
    assert 0.3 < f["co"][:, plains].mean() < 3.0  # mg m-3, from kg kg**-1 via p / (R_d T)
    assert 5 < f["o3"].mean() < 150
    assert float(f["psfc"][:, plateau].max()) < 64000 < 98000 < float(f["psfc"][:, z < 100].min())
    slope = np.polyfit(z[land], f["temp"].mean(0)[land], 1)[0]
    assert -0.009 < slope < -0.004  # K per m: the 6.5 K/km lapse rate shows through the climatology
    hourly = f["pm25"][:, plains].mean(1)
    hour = ds.time.dt.hour.values
    assert hourly[hour == 18].mean() > 1.3 * hourly[hour == 6].mean()  # ~02 vs ~14 local: nocturnal layer
    assert (pop[land] * z[land]).sum() / pop[land].sum() < 0.3 * z[land].mean()  # people live low
    assert (pop[~land] >= 0).all()


def test_population_comes_back_exactly_and_sea_fill_becomes_zero(tmp_path):
    """Split 4 x 4 into the raster and regridded conservatively back: the simulation's own values on land."""
    from pipeline.sample.simulate import make_surface

    cfg = _config(tmp_path)
    write_sample(cfg, progress=False)
    found = describe_sources(cfg.data)
    ground = regrid_elevation(cfg.data.domain)
    want = make_surface(Grid.from_domain(cfg.data.domain), ground.elevation, ground.land_fraction, 0).population
    got = found.static[cfg.data.names_of("static").index("population")]
    land = ground.land_fraction > 0
    np.testing.assert_allclose(got[land], want[land], rtol=1e-5)
    assert (got[~land] == 0).all()


def test_terrain_at_known_places():
    terrain = regrid_elevation(DEMO)
    z, lsm = terrain.elevation, terrain.land_sea_mask
    assert _cell(DEMO, z, 32.0, 90.0) > 4000  # Tibetan plateau
    assert 300 < _cell(DEMO, z, 30.5, 105.0) < 700  # Sichuan basin
    assert _cell(DEMO, z, 39.9, 116.4) < 150  # Beijing, North China plain
    assert _cell(DEMO, z, 18.0, 115.0) == 0 and _cell(DEMO, lsm, 18.0, 115.0) == 0  # South China Sea
    assert _cell(DEMO, lsm, 32.0, 90.0) == 1
    fine = DomainConfig(lat_south=27.0, lon_west=86.0, resolution=0.25, n_lat=8, n_lon=8)  # Everest region
    assert regrid_elevation(fine).elevation.max() > 5000


def test_regrid_is_the_area_mean_of_the_source_cells():
    """A 1-degree cell is the cos(lat)-weighted mean of its 12x12 source cells, ocean counted as 0 m."""
    with h5py.File(altitude_file(), "r") as f:
        codes = f["Altitude"][:]
    domain = DomainConfig(lat_south=20.0, lon_west=178.0, resolution=1.0, n_lat=2, n_lon=4)  # crosses 180
    got = regrid_elevation(domain)
    for i, lat_s in enumerate((20, 21)):
        rows = np.arange((90 - lat_s - 1) * 12, (90 - lat_s) * 12)
        weights = np.cos(np.deg2rad(90 - (rows + 0.5) / 12))
        for j, lon_w in enumerate((178, 179, 180, 181)):
            cols = np.arange((lon_w + 180) * 12, (lon_w + 181) * 12) % 4320
            block = codes[np.ix_(rows, cols)]
            metres = np.where(block == 255, 0.0, block * 28.0 - 450.0)
            want = (metres * weights[:, None]).sum() / (weights.sum() * 12)
            land = ((block != 255) * weights[:, None]).sum() / (weights.sum() * 12)
            assert got.elevation[i, j] == pytest.approx(want, abs=1e-6)
            assert got.land_fraction[i, j] == pytest.approx(land, abs=1e-9)


def test_barometric_and_magnus_formulas():
    # ICAO standard atmosphere: 89 875 Pa at 1000 m, 54 020 Pa at 5000 m
    assert barometric_pressure(np.array(101325.0), np.array(288.15), np.array(1000.0)) == pytest.approx(89875, rel=1e-3)
    assert barometric_pressure(np.array(101325.0), np.array(288.15), np.array(5000.0)) == pytest.approx(54020, rel=1e-3)
    assert saturation_vapour_pressure(np.array(20.0)) == pytest.approx(2337, rel=5e-3)  # 20 C


@settings(max_examples=60, deadline=None)
@given(st.floats(-20, 20), st.floats(-20, 20), st.floats(-0.05, 0.05), st.floats(-0.05, 0.05))
def test_deflection_removes_only_upslope_flow(u, v, sx, sy):
    du, dv = deflect_by_terrain(np.array([u]), np.array([v]), np.array([sx]), np.array([sy]))
    steep = np.hypot(sx, sy)
    if steep < 1e-9:  # (nearly) flat: at most the 1 - exp(-steep / 2e-3) ~ steep / 2e-3 share of the wind goes
        assert np.hypot(du[0] - u, dv[0] - v) <= np.hypot(u, v) * steep / 2e-3 + 1e-12
        return
    ex, ey = sx / steep, sy / steep
    up_before, up_after = u * ex + v * ey, du[0] * ex + dv[0] * ey
    along_before, along_after = -u * ey + v * ex, -du[0] * ey + dv[0] * ex
    assert along_after == pytest.approx(along_before, abs=1e-9)  # flow turns along the contours
    if up_before <= 0:
        assert up_after == pytest.approx(up_before, abs=1e-9)  # downslope flow untouched
    else:
        assert 0 <= up_after <= up_before + 1e-12


def _ridge_run(height: float, hours: int = 96, speed: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """A puff released west of a north-south ridge in a westerly; returns (initial, final) tracer."""
    grid = Grid.from_domain(DomainConfig(lat_south=25.0, lon_west=90.0, resolution=0.5, n_lat=20, n_lon=60))
    cols = np.arange(60)
    z = np.broadcast_to(height * np.exp(-(((cols - 30) / 2.5) ** 2)), grid.shape).copy()
    u, v = deflect_by_terrain(np.full(grid.shape, speed), np.zeros(grid.shape), *grid.gradient(z))
    conc = np.zeros((1, *grid.shape))
    conc[0, 8:12, 10:14] = 100.0
    start = conc.copy()
    for _ in range(hours):
        conc = transport(conc, u, v, grid, z, background=np.zeros(1))
    return start, conc


def test_transport_conserves_mass_and_positivity_on_flat_ground():
    start, end = _ridge_run(0.0, hours=24)
    assert end.min() >= 0
    assert end.sum() == pytest.approx(start.sum(), rel=1e-9)  # uniform translation, nothing left the domain
    centre = (end[0].sum(0) * np.arange(60)).sum() / end.sum()
    moved_km = (centre - 11.5) * 0.5 * 111.2 * np.cos(np.deg2rad(30))
    assert moved_km == pytest.approx(6.0 * 24 * 3.6, rel=0.1)  # 6 m/s for a day


def test_mountains_block_uphill_transport():
    start, flat = _ridge_run(0.0)
    _, ridge = _ridge_run(3000.0)
    lee_flat, lee_ridge = flat[0, :, 36:].sum(), ridge[0, :, 36:].sum()
    assert lee_flat > 0.3 * start.sum()  # without the ridge much of the puff has passed
    assert lee_ridge < 0.1 * lee_flat


def test_strong_wind_crosses_ridges_more_easily():
    """Same distance travelled (about 2000 km): 12 m/s for 2 days leaks more over the ridge than 3 m/s for 8."""
    start, weak = _ridge_run(1500.0, hours=192, speed=3.0)
    _, strong = _ridge_run(1500.0, hours=48, speed=12.0)
    lee_weak, lee_strong = weak[0, :, 36:].sum(), strong[0, :, 36:].sum()
    assert lee_strong > 2 * lee_weak
    assert lee_strong < 0.5 * start.sum()  # still a barrier


def test_a_config_without_a_sample_section_is_told_how_to_add_one(tmp_path, capsys):
    config = demo_config(tmp_path, TINY, 2, sample=None)
    assert main(["sample", "--config", str(config), "--no-progress"]) == 2
    assert "no data.sample section: add `sample: {dir: data/demo/raw}`" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()
