"""Files in the conventions of the real downloads, for the embedded sample and the test fixtures.

ERA5 single levels as the new CDS delivers them (netCDF4 from cfgrib; ECMWF, "GRIB to netCDF conversion
on new CDS and ADS systems", https://confluence.ecmwf.int/display/CKB/GRIB+to+netCDF+conversion+on+new+CDS+and+ADS+systems,
and an `ncdump -h` of a 2020 single-levels download):
- dims `valid_time` (int64 seconds since 1970-01-01, proleptic_gregorian), `latitude` (float64, descending,
  stored_direction="decreasing"), `longitude` (float64); a scalar int64 `number` (standard_name
  "realization"); `expver`, a 4-character string coordinate along valid_time ("0001" final ERA5,
  "0005" ERA5T), never a dim;
- float32 variables with NaN _FillValue, not packed, zlib level 1 + shuffle; ECMWF unit strings:
  u10/v10 "m s**-1", t2m/d2m "K", sp "Pa", z "m**2 s**-2", lsm "(0 - 1)" (ecCodes units.def), with
  GRIB_shortName / GRIB_paramId attributes; Conventions "CF-1.7".
The old CDS format (before 2024: `time` in hours since 1900-01-01, int16 packed with scale_factor /
add_offset and _FillValue = missing_value = -32767, and `expver` as a dim [1, 5] when ERA5 and ERA5T mix;
ESMValCore issue 761, ECMWF forum "ERA5 CDS requests which return a mixture of ERA5 and ERA5T data")
is written by `write_era5(..., legacy=True)`.

CAMS global reanalysis EAC4 as the new ADS delivers it (a 2023 `data_mlev.nc`, lucas-ige/geoscience-notebooks):
dims `valid_time`, `model_level` (float64 [60.0], the lowest of 60 levels), `latitude` (descending),
`longitude` (0..359.25 on the 0.75-degree global grid); 3-hourly; gases so2, no2, co, go3 as mass mixing
ratios "kg kg**-1" on model_level; pm2p5, pm10 in "kg m**-3" (single level; whether the ADS puts them
in the same file is unconfirmed: here they share it, without model_level).

CAQRA (Kong et al. 2021, ESSD 13, 529-570): one file per hour named CN-Reanalysis<YYYYMMDDHH>.nc (the
hour in Beijing time, UTC+8, as readers treat it), 2-D `lat2d` / `lon2d` variables on a ~15 km
curvilinear grid, fields pm25, pm10, so2, no2, o3 (ug/m3), co (mg/m3), u, v (m/s), temp (K), rh (%),
psfc (Pa), here with a leading singleton axis and no time coordinate (unconfirmed details: dims, units
attribute strings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

ERA5 = {  # short name -> (units, long_name, GRIB_shortName, GRIB_paramId, standard_name)
    "u10": ("m s**-1", "10 metre U wind component", "10u", 165, "unknown"),
    "v10": ("m s**-1", "10 metre V wind component", "10v", 166, "unknown"),
    "t2m": ("K", "2 metre temperature", "2t", 167, "unknown"),
    "d2m": ("K", "2 metre dewpoint temperature", "2d", 168, "unknown"),
    "sp": ("Pa", "Surface pressure", "sp", 134, "surface_air_pressure"),
    "z": ("m**2 s**-2", "Geopotential", "z", 129, "geopotential"),
    "lsm": ("(0 - 1)", "Land-sea mask", "lsm", 172, "land_binary_mask"),
}
CAMS = {  # short name -> (units, long_name, GRIB_paramId, on model levels)
    "pm2p5": ("kg m**-3", "Particulate matter d < 2.5 um", 210073, False),
    "pm10": ("kg m**-3", "Particulate matter d < 10 um", 210074, False),
    "so2": ("kg kg**-1", "Sulphur dioxide mass mixing ratio", 210122, True),
    "no2": ("kg kg**-1", "Nitrogen dioxide mass mixing ratio", 210121, True),
    "co": ("kg kg**-1", "Carbon monoxide mass mixing ratio", 210123, True),
    "go3": ("kg kg**-1", "Ozone mass mixing ratio (full chemistry scheme)", 210203, True),
}
CAQRA = {"pm25": "ug/m3", "pm10": "ug/m3", "so2": "ug/m3", "no2": "ug/m3", "o3": "ug/m3", "co": "mg/m3",
         "u": "m/s", "v": "m/s", "temp": "K", "rh": "%", "psfc": "Pa"}
GRIB_GLOBAL = {"GRIB_centre": "ecmf", "GRIB_centreDescription": "European Centre for Medium-Range Weather Forecasts",
               "Conventions": "CF-1.7", "institution": "European Centre for Medium-Range Weather Forecasts"}


def _coords(lat: np.ndarray, lon: np.ndarray) -> dict:
    return {"latitude": ("latitude", lat.astype(np.float64), {"units": "degrees_north", "standard_name": "latitude",
                                                             "long_name": "latitude", "stored_direction": "decreasing"}),
            "longitude": ("longitude", lon.astype(np.float64), {"units": "degrees_east", "standard_name": "longitude",
                                                               "long_name": "longitude"})}


def _save(ds: xr.Dataset, path: Path, encoding: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
    tmp.replace(path)
    return path


def _float_encoding(names: list[str], shape: tuple[int, ...]) -> dict:
    chunks = (1, *shape[1:])  # one chunk per time step: reading a step decompresses only that step
    return {n: {"dtype": "float32", "zlib": True, "complevel": 1, "shuffle": True, "_FillValue": np.float32(np.nan),
                "chunksizes": chunks} for n in names}


def _era5_attrs(short: str, lat: np.ndarray, lon: np.ndarray) -> dict:
    units, long_name, grib, param, standard = ERA5[short]
    return {"units": units, "long_name": long_name, "standard_name": standard, "GRIB_shortName": grib,
            "GRIB_paramId": param, "GRIB_units": units, "GRIB_typeOfLevel": "surface", "GRIB_stepType": "instant",
            "GRIB_gridType": "regular_ll", "GRIB_Nx": lon.size, "GRIB_Ny": lat.size,
            "GRIB_latitudeOfFirstGridPointInDegrees": float(lat[0]),
            "GRIB_longitudeOfFirstGridPointInDegrees": float(lon[0])}


def write_era5(path: Path, times: pd.DatetimeIndex, lat: np.ndarray, lon: np.ndarray,
               fields: dict[str, np.ndarray], expver: str = "0001") -> Path:
    """A new-CDS ERA5 single-levels file: fields (t, lat, lon) keyed by ECMWF short name."""
    seconds = ((times - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1)).to_numpy().astype(np.int64)
    ds = xr.Dataset(
        {short: (("valid_time", "latitude", "longitude"), values.astype(np.float32), _era5_attrs(short, lat, lon))
         for short, values in fields.items()},
        coords={"valid_time": ("valid_time", seconds, {"units": "seconds since 1970-01-01", "calendar":
                                                       "proleptic_gregorian", "standard_name": "time",
                                                       "long_name": "time"}),
                "number": ((), np.int64(0), {"long_name": "ensemble member numerical id", "units": "1",
                                             "standard_name": "realization"}),
                "expver": ("valid_time", np.array([expver] * len(times), dtype=object)), **_coords(lat, lon)},
        attrs={**GRIB_GLOBAL, "history": "GRIB to CDM+CF via cfgrib-0.9.15.1/ecCodes-2.48.2 (TopoFlow sample)"})
    for short in fields:
        ds[short].attrs["coordinates"] = "number valid_time latitude longitude expver"
    shape = next(iter(fields.values())).shape
    return _save(ds, path, {**_float_encoding(list(fields), shape), "valid_time": {"dtype": "int64"}})


def write_era5_legacy(path: Path, times: pd.DatetimeIndex, lat: np.ndarray, lon: np.ndarray,
                      fields: dict[str, np.ndarray], era5t_from: int | None = None) -> Path:
    """An old-CDS ERA5 file: `time` in hours since 1900, int16 packed; with `era5t_from`, an `expver` dim
    [1, 5] where the steps from that index on are ERA5T (expver 5) and NaN under expver 1, and vice versa."""
    data, encoding = {}, {}
    for short, values in fields.items():
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        scale = (hi - lo) / 65000 or 1.0
        encoding[short] = {"dtype": "int16", "scale_factor": scale, "add_offset": (hi + lo) / 2, "_FillValue": -32767,
                           "missing_value": -32767}
        attrs = {k: v for k, v in _era5_attrs(short, lat, lon).items() if not k.startswith("GRIB")}
        if era5t_from is None:
            data[short] = (("time", "latitude", "longitude"), values, attrs)
        else:
            final, prelim = values.astype(np.float64), values.astype(np.float64)
            final[era5t_from:], prelim[:era5t_from] = np.nan, np.nan
            data[short] = (("time", "expver", "latitude", "longitude"), np.stack([final, prelim], axis=1), attrs)
    coords = {"time": ("time", times), **_coords(lat, lon)}
    if era5t_from is not None:
        coords["expver"] = ("expver", np.array([1, 5], dtype=np.int32), {"long_name": "expver"})
    ds = xr.Dataset(data, coords=coords, attrs={"Conventions": "CF-1.6"})
    encoding["time"] = {"units": "hours since 1900-01-01 00:00:00.0", "calendar": "gregorian", "dtype": "int32"}
    return _save(ds, path, encoding)


def write_era5_invariant(path: Path, time: pd.Timestamp, lat: np.ndarray, lon: np.ndarray,
                         geopotential: np.ndarray, land_sea: np.ndarray) -> Path:
    """ERA5's invariant fields as the CDS delivers them: z and lsm with one valid_time."""
    return write_era5(path, pd.DatetimeIndex([time]), lat, lon, {"z": geopotential[None], "lsm": land_sea[None]})


def write_cams(path: Path, times: pd.DatetimeIndex, lat: np.ndarray, lon: np.ndarray,
               fields: dict[str, np.ndarray]) -> Path:
    """A new-ADS CAMS EAC4 file: fields (t, lat, lon) keyed by short name; gases on model_level 60."""
    data = {}
    for short, values in fields.items():
        units, long_name, param, on_levels = CAMS[short]
        attrs = {"units": units, "long_name": long_name, "GRIB_paramId": param, "GRIB_units": units}
        dims = ("valid_time", "model_level", "latitude", "longitude") if on_levels else ("valid_time", "latitude",
                                                                                         "longitude")
        data[short] = (dims, values[:, None] if on_levels else values, attrs)
    ds = xr.Dataset(data, coords={"valid_time": ("valid_time", times, {"standard_name": "time", "long_name": "time"}),
                                  "model_level": ("model_level", np.array([60.0]), {"long_name": "model level"}),
                                  **_coords(lat, lon)}, attrs=GRIB_GLOBAL)
    encoding = {n: {"dtype": "float32", "zlib": True, "complevel": 1, "shuffle": True, "_FillValue": np.float32(np.nan)}
                for n in fields}
    encoding["valid_time"] = {"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64"}
    return _save(ds, path, encoding)


def caqra_name(time_utc: pd.Timestamp) -> str:
    """CN-Reanalysis<YYYYMMDDHH>.nc, the hour in Beijing time (UTC+8)."""
    return f"CN-Reanalysis{time_utc + pd.Timedelta(hours=8):%Y%m%d%H}.nc"


def write_caqra(folder: Path, times: pd.DatetimeIndex, lat2d: np.ndarray, lon2d: np.ndarray,
                fields: dict[str, np.ndarray]) -> list[Path]:
    """CAQRA-style hourly files: (1, y, x) fields without a time coordinate, 2-D lat2d / lon2d."""
    paths = []
    for i, time in enumerate(times):
        ds = xr.Dataset({name: (("t", "y", "x"), values[i:i + 1].astype(np.float32), {"units": CAQRA[name]})
                         for name, values in fields.items()})
        ds["lat2d"], ds["lon2d"] = (("y", "x"), lat2d.astype(np.float32)), (("y", "x"), lon2d.astype(np.float32))
        paths.append(_save(ds, folder / caqra_name(time), {}))
    return paths


def write_density(path: Path, lat: np.ndarray, lon: np.ndarray, density: np.ndarray, name: str = "population_density"
                  ) -> Path:
    """A population density raster (CF NetCDF, latitude descending, longitudes -180..180, persons km-2),
    with a -9999 _FillValue where there are no people to count (sea)."""
    ds = xr.Dataset({name: (("latitude", "longitude"), density.astype(np.float32),
                            {"units": "km-2", "long_name": "population density"})}, coords=_coords(lat, lon))
    return _save(ds, path, {name: {"dtype": "float32", "_FillValue": np.float32(-9999.0)}})
