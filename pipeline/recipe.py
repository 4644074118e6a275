"""The sources recipe (DESIGN.md "Raw sources (schema 3)"): which files hold which variables, how
they are regridded, what is derived, and where the statics come from.

Every name in a recipe lives in one pool: the keys of `sources[].variables`, the keys of `derived`,
and the built-ins `dem_elevation` (m) and `dem_land_fraction` (1), the embedded 1/12-degree DEM
(pvlib) averaged onto the target grid. Model variables, derived formulas, the barrier's elevation
and the loss mask all refer to pool names.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from topoflow.config import Strict

BUILTINS = ("dem_elevation", "dem_land_fraction")
# regridding defaults a scientist would accept: conservative for concentrations and fluxes onto a
# coarser grid (mass is kept), bilinear for smooth state variables (winds, temperature, pressure)
Regrid = Literal["none", "bilinear", "conservative", "nearest"]


class SourceVariable(Strict):
    """One variable of a source files and the selection that makes it (lat, lon) per time step."""

    var: str = Field(description="the variable's name in the files, e.g. u10 or go3")
    select: dict[str, int | float | str] = Field(
        default={}, description="dims to select away, e.g. {model_level: 60} for CAMS gases near the surface")


class DownloadSpec(Strict):
    """How to request the source from the Copernicus data stores (`python -m pipeline requests`)."""

    dataset: str = Field(description="CDS/ADS dataset id, e.g. reanalysis-era5-single-levels")
    request: dict = Field(default={}, description="the fixed part of the request; area and dates come from data")
    per: Literal["month", "once"] = Field(default="month", description="one request (and file) per month, or one")
    dates: Literal["year_month_day", "date_range", "fixed"] = Field(
        default="year_month_day", description="the CDS's year/month/day lists, the ADS's 'date' range, or the "
                                              "dates already in `request` (invariant fields)")
    margin_deg: float = Field(default=1.0, ge=0, description="area beyond data.domain on every side")


class SourceSpec(Strict):
    """Files of one reanalysis (or one prepared file), read lazily, block by block."""

    name: str
    files: str | list[str] = Field(description="a path, a glob, or a list of them; NetCDF files or Zarr stores")
    variables: dict[str, str | SourceVariable] = Field(description="pool name -> source variable")
    regrid: Regrid = "bilinear"
    fill: float | None = Field(default=None, description="value for missing cells (fill values, NaN), logged; "
                                                         "e.g. 0 for a population density over sea")
    filename_time: str | None = Field(default=None, description="strptime pattern of the time in each file's name, "
                                      "for files without a time coordinate (CAQRA: CN-Reanalysis%Y%m%d%H.nc)")
    utc_offset_hours: int = Field(default=0, description="the files' clock minus UTC, e.g. 8 for Beijing time")
    download: DownloadSpec | None = None

    @field_validator("variables", mode="after")
    @classmethod
    def _expand(cls, variables: dict[str, str | SourceVariable]) -> dict[str, str | SourceVariable]:
        return {k: SourceVariable(var=v) if isinstance(v, str) else v for k, v in variables.items()}

    def selection(self, name: str) -> SourceVariable:
        variable = self.variables[name]
        assert isinstance(variable, SourceVariable)
        return variable

    def paths(self) -> list[Path]:
        """The files, globs expanded and sorted (a glob matching nothing gives no file)."""
        patterns = [self.files] if isinstance(self.files, str) else self.files
        found: list[Path] = []
        for pattern in patterns:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            found += [Path(m) for m in matches]
        return found


class DerivedSpec(Strict):
    """A variable computed from pool variables by a documented formula (`pipeline.sources.derived`)."""

    formula: Literal["relative_humidity_from_dewpoint", "height_from_geopotential"]
    args: dict[str, str] = Field(description="formula argument -> pool name, e.g. {temperature: temp, dewpoint: d2m}")


class LossMaskSpec(Strict):
    """Cells that count in loss and metrics: where a pool variable (a land-sea fraction) reaches a threshold."""

    variable: str = "dem_land_fraction"
    threshold: float = 0.5


class StaticSpec(Strict):
    """The barrier's elevation and the loss mask, as pool names."""

    elevation: str = Field(default="dem_elevation", description="metres; the embedded DEM unless a source gives it")
    loss_mask: LossMaskSpec | None = LossMaskSpec()


class AirDensitySpec(Strict):
    """rho = p / (R_d T) of the same time and place, to turn mass mixing ratios into concentrations."""

    pressure: str = "psfc"
    temperature: str = "temp"


class GapSpec(Strict):
    """Missing times are gaps (`valid` False) unless a gap this short may be interpolated (recorded)."""

    interpolate_max_hours: int = Field(default=0, ge=0)


class Recipe(Strict):
    """Sources, derived variables, air density, statics and gaps: everything the build reads or computes."""

    sources: list[SourceSpec]
    derived: dict[str, DerivedSpec] = {}
    air_density: AirDensitySpec | None = None
    static: StaticSpec = StaticSpec()
    gaps: GapSpec = GapSpec()

    @model_validator(mode="after")
    def _names(self) -> "Recipe":
        names = [n for s in self.sources for n in s.variables] + list(self.derived)
        dup = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(BUILTINS)))
        if dup:
            raise ValueError(f"recipe names given twice (or shadowing a built-in {BUILTINS}): {dup}")
        sources = [s.name for s in self.sources]
        if len(set(sources)) != len(sources):
            raise ValueError(f"source names must be distinct, got {sources}")
        pool = set(names) | set(BUILTINS)
        wanted = [(f"derived {k}", a) for k, d in self.derived.items() for a in d.args.values()]
        wanted += [("static.elevation", self.static.elevation)]
        wanted += [("static.loss_mask", self.static.loss_mask.variable)] if self.static.loss_mask else []
        wanted += [(f"air_density.{k}", v) for k, v in (self.air_density or AirDensitySpec()).model_dump().items()
                   ] if self.air_density else []
        unknown = [f"{who}: {name!r}" for who, name in wanted if name not in pool]
        if unknown:
            raise ValueError(f"unknown recipe names ({'; '.join(unknown)}); known: {sorted(pool)}")
        return self

    @property
    def pool(self) -> list[str]:
        return [n for s in self.sources for n in s.variables] + list(self.derived) + list(BUILTINS)
