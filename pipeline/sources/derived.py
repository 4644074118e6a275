"""Derived variables declared in the recipe (`data.derived`), computed by documented formulas.

Each formula names its arguments with the units it computes in; the build converts the pool
variables to those units first, so ERA5's Kelvin dewpoint and a Celsius one give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

G0 = 9.80665  # m s-2, standard gravity (WMO): elevation = geopotential / g0


def saturation_vapour_pressure(t_celsius: np.ndarray) -> np.ndarray:
    """Magnus formula over water (WMO 2008, No. 8, Annex 4.B): e_s = 611.2 exp(17.62 T / (243.12 + T)) Pa."""
    return 611.2 * np.exp(17.62 * t_celsius / (243.12 + t_celsius))


def dewpoint_from_vapour_pressure(e_pa: np.ndarray) -> np.ndarray:
    """The inverse of `saturation_vapour_pressure`: the temperature (degC) at which e is saturating."""
    x = np.log(e_pa / 611.2)
    return 243.12 * x / (17.62 - x)


def relative_humidity_from_dewpoint(temperature: np.ndarray, dewpoint: np.ndarray) -> np.ndarray:
    """RH (%) = 100 e_s(Td) / e_s(T), T and Td in degC (WMO 2008 Magnus)."""
    return 100.0 * saturation_vapour_pressure(dewpoint) / saturation_vapour_pressure(temperature)


def height_from_geopotential(geopotential: np.ndarray) -> np.ndarray:
    """Geopotential height (m) = Phi / g0; ERA5's surface geopotential `z` gives the model orography."""
    return geopotential / G0


@dataclass(frozen=True)
class Formula:
    """A derived variable's function, the units each argument is computed in, and the result's units."""

    compute: Callable[..., np.ndarray]
    args: dict[str, str]
    units: str


FORMULAS = {
    "relative_humidity_from_dewpoint": Formula(relative_humidity_from_dewpoint,
                                               {"temperature": "degC", "dewpoint": "degC"}, "%"),
    "height_from_geopotential": Formula(height_from_geopotential, {"geopotential": "m**2 s**-2"}, "m"),
}
