"""The embedded sample: real terrain, build-facing layout, determinism, physics sanity, terrain barrier."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.__main__ import main
from pipeline.config import DomainConfig, load_pipeline_config
from pipeline.sample.simulate import (Grid, barometric_pressure, deflect_by_terrain, saturation_vapour_pressure,
                                      transport)
from pipeline.sample.terrain import altitude_file, regrid_elevation
from pipeline.sample.write import SampleError, write_sample
from pipeline.source import describe_source
from tests.helpers import tiny_raw_config, write_config, write_synthetic_source

DEMO = DomainConfig(lat_south=15.0, lon_west=70.0, resolution=1.0, n_lat=32, n_lon=64)


def _cell(domain: DomainConfig, field: np.ndarray, lat: float, lon: float) -> float:
    i = int(np.argmin(np.abs(np.array(domain.latitudes()) - lat)))
    j = int(np.argmin(np.abs(np.array(domain.longitudes()) - lon)))
    return float(field[i, j])


def _config(tmp_path: Path, time_chunk: int = 8, **sample):
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = tiny_raw_config(tmp_path)
    raw["data"]["sample"].update(sample)
    raw["build"]["time_chunk"] = time_chunk
    return load_pipeline_config(write_config(raw, tmp_path / "tiny.yaml"))


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory: pytest.TempPathFactory):
    """The tiny config's sample (8x16 cells over 30-38 N, 100-116 E, 48 three-hourly steps)."""
    cfg = _config(tmp_path_factory.mktemp("sample"))
    write_sample(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def demo_winter(tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    """Ten winter days of the demo domain (32x64 over China), 6-hourly."""
    root = tmp_path_factory.mktemp("demo")
    raw = tiny_raw_config(root)
    raw["data"]["domain"] = DEMO.model_dump()
    raw["data"]["regions"] = [4, 8]
    raw["data"]["sample"], raw["data"]["step_hours"] = {"seed": 0}, 6
    raw["data"]["leads_h"] = [6, 12]
    raw["data"]["splits"] = {"train": {"start": "2018-01-10T00:00", "end": "2018-01-19T18:00"}}
    cfg = load_pipeline_config(write_config(raw, root / "demo.yaml"))
    return xr.open_dataset(write_sample(cfg, progress=False)).load()


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


def test_layout_matches_what_the_build_reads(tiny_sample, tmp_path):
    ds = xr.open_dataset(tiny_sample.data.raw)
    ref_cfg = _config(tmp_path)
    ref = write_synthetic_source(ref_cfg)
    assert set(ds.data_vars) == set(ref.data_vars)
    for name in ref.data_vars:
        assert ds[name].dims == ref[name].dims, name
        assert ds[name].attrs["units"] == ref[name].attrs["units"], name
        assert ds[name].dtype == np.float32, name
    np.testing.assert_allclose(ds.latitude, ref.latitude)
    np.testing.assert_allclose(ds.longitude, ref.longitude)
    assert (np.diff(ds.latitude) < 0).all()  # descending, like ERA5
    np.testing.assert_array_equal(ds.time, ref.time)
    assert ds.latitude.attrs["units"] == "degrees_north" and ds.longitude.attrs["units"] == "degrees_east"
    assert ds.time.attrs["standard_name"] == "time"
    assert set(np.unique(ds.lsm)) <= {0.0, 1.0}
    for spec in tiny_sample.data.variables:  # units exactly as the config declares
        if spec.source:
            assert ds[spec.source].attrs["units"] == spec.units
    found = describe_source(tiny_sample)  # the build's own validation accepts it
    assert found.missing_times == [] and found.loss_mask.dtype == bool


def test_deterministic_and_seeded(tiny_sample, tmp_path):
    again = _config(tmp_path / "a", time_chunk=5)  # other write blocks, same data
    other = _config(tmp_path / "b", seed=7)
    a = xr.open_dataset(tiny_sample.data.raw)
    b = xr.open_dataset(write_sample(again, progress=False))
    c = xr.open_dataset(write_sample(other, progress=False))
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert not np.array_equal(a["pm2p5"].values, c["pm2p5"].values)
    np.testing.assert_array_equal(a["orography"].values, c["orography"].values)  # terrain is not random


def test_skip_overwrite_and_refuse(tmp_path, capsys):
    cfg = _config(tmp_path)
    path = write_sample(cfg, progress=False)
    stamp = path.stat().st_mtime_ns
    assert write_sample(cfg, progress=False) == path and path.stat().st_mtime_ns == stamp
    assert "up to date" in capsys.readouterr().out
    write_sample(cfg, overwrite=True, progress=False)
    assert path.stat().st_mtime_ns != stamp
    changed = _config(tmp_path, seed=5)  # same path, another config: regenerated
    write_sample(changed, progress=False)
    assert "another config" in capsys.readouterr().out
    assert not list(tmp_path.glob(".raw.nc.tmp*"))  # no temporary left behind
    path.write_bytes(b"somebody's reanalysis")
    with pytest.raises(SampleError, match="not written by `pipeline sample`"):
        write_sample(cfg, progress=False)
    assert path.read_bytes() == b"somebody's reanalysis"


def test_cli_set_overrides(tmp_path, capsys):
    config = write_config(tiny_raw_config(tmp_path), tmp_path / "tiny.yaml")
    args = ["sample", "--config", str(config), "--set", "data.sample.seed=3", "--no-progress"]
    assert main(args) == 0
    assert xr.open_dataset(tmp_path / "raw.nc").attrs["seed"] == 3
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["sample", "--config", str(config), "--set", "data.variables=[{name: blh, source: blh, units: m}]",
                 "--set", "data.targets=[]", "--set", "data.wind=[blh, blh]", "--overwrite", "--no-progress"]) == 2
    assert "cannot simulate" in capsys.readouterr().err


def test_physical_sanity(demo_winter):
    ds = demo_winter
    for name in ("pm2p5", "pm10", "so2", "no2", "co", "go3"):
        assert np.isfinite(ds[name]).all() and (ds[name] > 0).all(), name
    assert (ds.pm2p5 <= ds.pm10 + 1e-3).all()  # PM2.5 is part of PM10
    assert ((ds.r2 >= 0) & (ds.r2 <= 100)).all()
    z = ds.orography.values
    plateau, plains = z > 4000, (z < 200) & (ds.population.values > 300) & (ds.lsm.values == 1)
    assert plateau.sum() > 20 and plains.sum() > 10
    pm = ds.pm2p5.mean("time").values
    assert pm[plains].mean() > 4 * pm[plateau].mean()  # emissions from low populated land, blocked uphill
    assert 30 < pm[plains].mean() < 400  # tens to a few hundred ug/m3 in the winter plains
    assert 0.3 < ds.co.values[:, plains].mean() < 3.0  # mg m-3
    assert 5 < ds.go3.mean() < 150
    assert float(ds.sp.values[:, plateau].max()) < 64000 < 98000 < float(ds.sp.values[:, z < 100].min())
    t_mean = ds.t2m.mean("time").values
    slope = np.polyfit(z[ds.lsm.values == 1], t_mean[ds.lsm.values == 1], 1)[0]
    assert -0.009 < slope < -0.004  # K per m: the 6.5 K/km lapse rate shows through the climatology
    hourly = ds.pm2p5.values[:, plains].mean(1)
    assert hourly.std() / hourly.mean() > 0.1  # weather and the boundary layer move it around
    hour = ds.time.dt.hour.values
    night, afternoon = hourly[hour == 18].mean(), hourly[hour == 6].mean()  # ~02 and ~14 local time in China
    assert night > 1.3 * afternoon  # shallow nocturnal boundary layer concentrates, daytime mixing dilutes
    land = ds.lsm.values == 1
    pop = ds.population.values
    assert (pop[land] * z[land]).sum() / pop[land].sum() < 0.3 * z[land].mean()  # people live low


def test_barometric_and_magnus_formulas():
    # ICAO standard atmosphere: 89 875 Pa at 1000 m, 54 020 Pa at 5000 m
    assert barometric_pressure(np.array(101325.0), np.array(288.15), np.array(1000.0)) == pytest.approx(89875, rel=1e-3)
    assert barometric_pressure(np.array(101325.0), np.array(288.15), np.array(5000.0)) == pytest.approx(54020, rel=1e-3)
    assert saturation_vapour_pressure(np.array(293.15)) == pytest.approx(2337, rel=5e-3)  # 20 C


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
    raw = tiny_raw_config(tmp_path)
    del raw["data"]["sample"]
    config = write_config(raw, tmp_path / "tiny.yaml")
    assert main(["sample", "--config", str(config), "--no-progress"]) == 2
    assert "no data.sample section: add `sample: {seed: 0}`" in capsys.readouterr().err
    assert not (tmp_path / "raw.nc").exists()
