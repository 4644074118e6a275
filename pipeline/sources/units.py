"""Units converted, not compared: pint with cf-xarray's registry (CF/UDUNITS strings such as `m s-1`),
which also reads ECMWF's `m s**-1`, `kg m**-3`, `kg kg**-1` and `m**2 s**-2`.

A conversion is affine (value * scale + offset, e.g. K -> degC), or, for a mass mixing ratio
(kg kg**-1) into a mass concentration (ug m-3), a product with the air density of the same time and
place, rho = p / (R_d T) (`air_density`). Anything else is an error naming both units.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cf_xarray.units
import numpy as np
import pint

from topoflow.errors import SourceError

UREG: pint.UnitRegistry = cf_xarray.units.units
ALIASES = {"(0 - 1)": "1", "~": "1", "0-1": "1", "fraction": "1"}  # ECMWF's dimensionless spellings
R_DRY = 287.05  # J kg-1 K-1, specific gas constant of dry air (WMO)
_MASS_RATIO = re.compile(r"^\s*([munµ]?g|kg)\s*(/\s*|\s+)([munµ]?g|kg)(\*\*-1|-1|\^-1)?\s*$")
DENSITY_UNITS = "kg m-3"


def parse(units: str, where: str) -> pint.Unit:
    """The pint unit of a units string; an unknown one is a SourceError naming it and where it was found."""
    try:
        return UREG.parse_units(ALIASES.get(units.strip(), units))
    except (pint.errors.PintError, ValueError, AssertionError, TypeError) as exc:
        raise SourceError(f"{where}: units {units!r} cannot be read ({type(exc).__name__}); fix the file's units "
                          "attribute, or convert it to a CF/UDUNITS unit string") from None


def is_mass_ratio(units: str) -> bool:
    """kg kg**-1, g/kg, ug kg-1 ...: a mass mixing ratio (not a volume ratio, which needs a molar mass)."""
    return _MASS_RATIO.match(units) is not None


@dataclass(frozen=True)
class Conversion:
    """target = source * scale + offset, times the air density (kg m-3) when `density`."""

    scale: float
    offset: float
    density: bool
    text: str

    def apply(self, values: np.ndarray, rho: np.ndarray | None) -> np.ndarray:
        if self.density:
            values = values * rho
        if self.scale == 1.0 and self.offset == 0.0:
            return values
        return values * self.scale + self.offset


def _affine(source: pint.Unit, target: pint.Unit) -> tuple[float, float]:
    zero = UREG.Quantity(0.0, source).to(target).magnitude
    one = UREG.Quantity(1.0, source).to(target).magnitude
    return float(one - zero), float(zero)


def conversion(source_units: str, target_units: str, where: str) -> Conversion:
    """How to bring a variable from its source units to the store's; SourceError naming both otherwise."""
    source, target = parse(source_units, where), parse(target_units, f"{where} (config units)")
    if source.dimensionality == target.dimensionality:
        scale, offset = _affine(source, target)
        same = scale == 1.0 and offset == 0.0
        return Conversion(scale, offset, False, "" if same else f"{source_units} -> {target_units}")
    density = parse(DENSITY_UNITS, "air density")
    if is_mass_ratio(source_units) and (source * density).dimensionality == target.dimensionality:
        scale, _ = _affine(source * density, target)
        return Conversion(scale, 0.0, True, f"{source_units} -> {target_units} with the air density p / (R_d T)")
    raise SourceError(f"{where}: cannot convert {source_units!r} to {target_units!r} (source {source.dimensionality}, "
                      f"config {target.dimensionality}); declare units the source can be converted to")


def air_density(pressure_pa: np.ndarray, temperature_k: np.ndarray) -> np.ndarray:
    """rho = p / (R_d T) in kg m-3, dry air (ideal gas law)."""
    return pressure_pa / (R_DRY * temperature_k)
