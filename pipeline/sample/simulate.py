"""Simulated surface meteorology and chemistry on real terrain, for the embedded sample.

Not a forecast model: a cheap, deterministic stand-in whose fields carry the physics the
TopoFlow model claims to exploit, so the sample can show whether wind scanning and the elevation
barrier help. Everything is vectorised over the grid; one Python iteration per simulated hour.

Ingredients (formulas referenced where they are textbook):
- wind: westerly jet band + monsoon-season pressure pattern (Siberian high in winter, thermal low in
  summer) + synoptic highs/lows drifting east (Gaussian streamfunctions, geostrophic
  u = -dpsi/dy, v = dpsi/dx, pressure anomaly p' = rho f psi), reduced by surface friction and turned
  ~20 degrees toward low pressure (Ekman), then the upslope component damped by the terrain slope;
- temperature: latitude/season climatology minus the standard lapse rate 6.5 K/km (ICAO standard
  atmosphere) plus a diurnal cycle and warm/cold advection by the synoptic meridional wind;
- surface pressure: barometric formula p = p0 (1 - L z / T0)^(g M / (R L)) (standard atmosphere);
- humidity: vapour pressure from a moisture climatology, RH = e / e_s(T) with the Magnus formula
  e_s = 611.2 exp(17.62 Tc / (243.12 + Tc)) Pa (WMO 2008), so RH peaks at night;
- boundary layer: a daily maximum mixing depth H and a diurnal height h(t); surface
  concentrations are the mixed-layer mean times a stable-layer factor sqrt(H / h) (night: high);
- emissions from population (cities placed in low, flat, moist land), winter coal heating north
  of 33 N, traffic diurnal profile, wind-blown dust from dry interior land;
- transport: semi-Lagrangian advection (bilinear `scipy.ndimage.map_coordinates`, sub-stepped so
  no step moves air more than one cell), explicit horizontal diffusion, and a terrain barrier: air
  arriving from a departure point lower than the receiver passes only a fraction
  exp(-2 relu(z_r - z_d) / 1000 m * m(w)), m(w) = 1 - 0.5 sigmoid(w - 5) (DESIGN.md's barrier),
  the rest is replaced by background air (lifted out of the boundary layer);
- chemistry/loss: SO2 -> sulfate (gas + aqueous, faster when humid), NO2 -> nitrate (cold, humid),
  daytime O3 production from NO2 photolysis (saturating in NO2), NO titration of O3 at emission,
  dry deposition v_d / h, wet scavenging at high RH, venting to the free troposphere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline.config import DomainConfig
from pipeline.sources.derived import relative_humidity_from_dewpoint

R_EARTH = 6.371e6  # m
OMEGA = 7.2921e-5  # s-1, Earth's rotation rate
RHO_AIR = 1.225  # kg m-3, sea-level standard density
G0, M_AIR, R_GAS = 9.80665, 0.0289644, 8.3144598  # standard gravity, molar mass of air, gas constant
LAPSE = 0.0065  # K m-1, standard-atmosphere lapse rate
BARO_EXP = G0 * M_AIR / (R_GAS * LAPSE)  # 5.2559
P_SEA = 101325.0  # Pa
DT = 3600.0  # s, one simulated hour
BARRIER_ALPHA, BARRIER_Z0 = 2.0, 1000.0  # same form and constants as DESIGN.md's attention barrier

SPECIES = ("pm25", "coarse", "so2", "no2", "co", "o3")  # internal state, all in ug m-3
BACKGROUND = np.array([6.0, 8.0, 1.0, 1.0, 110.0, 85.0])  # free-troposphere / inflow values, ug m-3
DRY_DEPOSITION = np.array([0.001, 0.01, 0.005, 0.003, 0.0, 0.004])  # v_d, m s-1
EMISSION_PER_PERSON = np.array([300.0, 150.0, 550.0, 650.0, 4500.0, 0.0])  # ug s-1 per inhabitant
DIFFUSIVITY = 1.0e4  # m2 s-1, sub-grid horizontal mixing


@dataclass(frozen=True)
class Grid:
    """Regular lat/lon grid, latitude ASCENDING (row 0 southernmost)."""

    lat: np.ndarray
    lon: np.ndarray

    @classmethod
    def from_domain(cls, domain: DomainConfig) -> "Grid":
        return cls(np.array(domain.latitudes()), np.array(domain.longitudes()))

    @property
    def shape(self) -> tuple[int, int]:
        return self.lat.size, self.lon.size

    @cached_property
    def dy(self) -> float:
        """Cell height (m)."""
        return R_EARTH * np.deg2rad(self.lat[1] - self.lat[0] if self.lat.size > 1 else self.lon[1] - self.lon[0])

    @cached_property
    def dx(self) -> np.ndarray:
        """Cell width per row (m), shape (n_lat, 1)."""
        res = self.lon[1] - self.lon[0] if self.lon.size > 1 else self.lat[1] - self.lat[0]
        return (R_EARTH * np.deg2rad(res) * np.cos(np.deg2rad(self.lat)))[:, None]

    def gradient(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(d/dx, d/dy) of a 2-D field in units per metre (centred differences)."""
        gy, gx = np.gradient(field)
        return gx / self.dx, gy / self.dy


@dataclass(frozen=True)
class Surface:
    """Static fields on the grid: terrain, land, moisture climatology, population, emissions."""

    elevation: np.ndarray  # m
    land: np.ndarray  # land fraction 0..1
    moisture: np.ndarray  # 0 (desert interior) .. 1 (ocean), climatological
    population: np.ndarray  # inhabitants km-2
    slope_x: np.ndarray  # dz/dx, m m-1
    slope_y: np.ndarray


def moisture_climatology(grid: Grid, land: np.ndarray) -> np.ndarray:
    """Wetness 0..1: a wide (800 km) smoothing of the sea fraction, so interiors are dry.

    A proxy for distance to the ocean, the main control of continental humidity and aridity.
    """
    sigma = (800e3 / grid.dy, 800e3 / float(grid.dx.mean()))
    return np.clip(0.15 + ndimage.gaussian_filter(1.0 - land, sigma=sigma, mode="nearest") * 1.6, 0.0, 1.0)


def synthetic_population(grid: Grid, elevation: np.ndarray, land: np.ndarray, moisture: np.ndarray,
                         rng: np.random.Generator, n_cities: int = 500) -> np.ndarray:
    """Population density (km-2): a rural background plus Gaussian cities in low, flat, moist land.

    City sites are drawn with probability proportional to land * exp(-z / 400 m) *
    exp(-slope / 3 m/km) * moisture, i.e. where people really settle (plains, basins, coasts).
    Each city's inhabitants are lognormal (median 2 million) spread over sigma = 20-60 km; the
    kernel is widened by the cell size so cell values approximate area means at any resolution.
    """
    gx, gy = grid.gradient(elevation)
    slope = np.hypot(gx, gy)
    suit = land * np.exp(-np.clip(elevation, 0, None) / 400.0) * np.exp(-slope / 3e-3) * moisture
    rural = 350.0 * land * np.sqrt(moisture) * np.exp(-np.clip(elevation, 0, None) / 600.0 - slope / 5e-3)
    if suit.sum() <= 0:
        return rural
    p = (suit / suit.sum()).ravel()
    cells = rng.choice(p.size, size=n_cities, p=p)
    ny, nx = grid.shape
    res = grid.lat[1] - grid.lat[0] if ny > 1 else grid.lon[1] - grid.lon[0]
    clat = grid.lat[cells // nx] + rng.uniform(-0.5, 0.5, n_cities) * res
    clon = grid.lon[cells % nx] + rng.uniform(-0.5, 0.5, n_cities) * res
    people = rng.lognormal(np.log(2e6), 0.9, n_cities)
    sigma_km = np.hypot(rng.uniform(20.0, 60.0, n_cities), grid.dy / 1e3 / np.sqrt(12.0))
    density = rural.copy()
    lat2, lon2 = np.meshgrid(grid.lat, grid.lon, indexing="ij")
    for la, lo, n, s in zip(clat, clon, people, sigma_km):
        d2 = ((lat2 - la) * 111.2) ** 2 + ((lon2 - lo) * 111.2 * np.cos(np.deg2rad(la))) ** 2
        density += n / (2 * np.pi * s**2) * np.exp(-d2 / (2 * s**2))
    return density


def make_surface(grid: Grid, elevation: np.ndarray, land: np.ndarray, seed: int) -> Surface:
    """Derive the static fields; the population is seeded (stream 0 of the config seed)."""
    moisture = moisture_climatology(grid, land)
    population = synthetic_population(grid, elevation, land, moisture, np.random.default_rng([seed, 0]))
    sx, sy = grid.gradient(elevation)
    return Surface(elevation, land, moisture, population, sx, sy)


@dataclass(frozen=True)
class Systems:
    """Schedule of synoptic highs and lows (drawn once from the seed, so the run is deterministic)."""

    start_h: np.ndarray  # hours since the schedule origin
    life_h: np.ndarray
    lat0: np.ndarray
    lon0: np.ndarray
    speed_u: np.ndarray  # m s-1, eastward drift
    speed_v: np.ndarray
    radius: np.ndarray  # m
    vmax: np.ndarray  # m s-1, signed: > 0 anticyclone (high), < 0 cyclone (low)


def synoptic_schedule(grid: Grid, hours: float, rng: np.random.Generator) -> Systems:
    """Highs and lows every ~36 h entering from the west side of the domain, for `hours` hours."""
    n = int(hours / 36.0 * 1.5) + 8
    start = np.cumsum(rng.exponential(36.0, n)) - 240.0  # some already under way at the origin
    width = grid.lon[-1] - grid.lon[0]
    lat0 = rng.uniform(grid.lat[0], grid.lat[-1] + 5.0, n)
    lon0 = grid.lon[0] + rng.uniform(-10.0, 0.5 * width, n)
    sign = np.where(rng.uniform(size=n) < 0.55, -1.0, 1.0)
    return Systems(start, rng.uniform(96.0, 240.0, n), lat0, lon0, rng.normal(8.0, 2.5, n),
                   rng.normal(0.0, 1.5, n), rng.uniform(5e5, 1.5e6, n), sign * rng.uniform(4.0, 11.0, n))


def gaussian_streamfunction(grid: Grid, lat: float, lon: float, radius: float, vmax: float) -> np.ndarray:
    """psi = A exp(-r^2 / R^2) with A set so the maximum wind (at r = R / sqrt 2) is |vmax|.

    Distances use the metric at the system's centre latitude, which makes the Gaussian separable
    (an outer product of two 1-D profiles): cheap enough to evaluate every hour.
    """
    y = (grid.lat - lat) * np.deg2rad(1.0) * R_EARTH
    x = (grid.lon - lon) * np.deg2rad(1.0) * R_EARTH * np.cos(np.deg2rad(lat))
    amplitude = vmax * radius * np.exp(0.5) / np.sqrt(2.0)
    return np.outer(amplitude * np.exp(-(y**2) / radius**2), np.exp(-(x**2) / radius**2))


def winter_index(time: pd.Timestamp) -> float:
    """+1 in mid-January, -1 in mid-July (annual harmonic)."""
    return float(np.cos(2 * np.pi * (time.day_of_year - 15) / 365.25))


def cos_zenith(grid: Grid, time: pd.Timestamp) -> np.ndarray:
    """Cosine of the solar zenith angle, clipped at 0 (Cooper 1969 declination, hour angle from lon)."""
    decl = np.deg2rad(23.44) * np.sin(2 * np.pi * (284 + time.day_of_year) / 365.0)
    hour = time.hour + time.minute / 60.0
    omega = np.deg2rad(15.0 * (hour + grid.lon[None, :] / 15.0 - 12.0))
    phi = np.deg2rad(grid.lat[:, None])
    return np.clip(np.sin(phi) * np.sin(decl) + np.cos(phi) * np.cos(decl) * np.cos(omega), 0.0, None)


def local_hour(grid: Grid, time: pd.Timestamp) -> np.ndarray:
    """Local solar hour (0..24), shape (1, n_lon)."""
    return ((time.hour + time.minute / 60.0 + grid.lon[None, :] / 15.0) % 24.0)


def wind_modulation(speed: np.ndarray) -> np.ndarray:
    """m(w) = 1 - 0.5 sigmoid(w - 5), w in m/s: DESIGN.md's barrier modulation (strong wind crosses ridges)."""
    return 1.0 - 0.5 / (1.0 + np.exp(-(speed - 5.0)))


def deflect_by_terrain(u: np.ndarray, v: np.ndarray, slope_x: np.ndarray, slope_y: np.ndarray,
                       scale: float = 2e-3) -> tuple[np.ndarray, np.ndarray]:
    """Remove the upslope wind component in proportion (1 - exp(-|grad z| / scale)) m(w).

    Stable air flows around rather than over mountains (low Froude number); on a slope of a few
    m/km the upslope part of a light wind is almost gone, so the flow turns along the contours.
    Strong wind keeps up to half of it (m(w) -> 0.5), as flow over ridges needs a high Froude
    number. Downslope flow is left alone.
    """
    steep = np.hypot(slope_x, slope_y)
    ex, ey = slope_x / np.maximum(steep, 1e-12), slope_y / np.maximum(steep, 1e-12)
    damping = (1.0 - np.exp(-steep / scale)) * wind_modulation(np.hypot(u, v))
    upslope = np.clip(u * ex + v * ey, 0.0, None) * damping
    return u - upslope * ex, v - upslope * ey


def barometric_pressure(sea_level_pa: np.ndarray, sea_level_t: np.ndarray, z: np.ndarray) -> np.ndarray:
    """p = p0 (1 - L z / T0)^(g M / (R L)), the standard-atmosphere barometric formula."""
    return sea_level_pa * (1.0 - LAPSE * z / sea_level_t) ** BARO_EXP


def transport(conc: np.ndarray, u: np.ndarray, v: np.ndarray, grid: Grid, elevation: np.ndarray,
              dt: float = DT, background: np.ndarray = BACKGROUND) -> np.ndarray:
    """Advect (species, y, x) concentrations for dt seconds: semi-Lagrangian with the terrain barrier.

    Sub-steps keep each departure point within one cell (CFL <= 1). Departure values are bilinear
    (convex weights, so positivity is kept); air from outside the domain has the background value.
    At each receiver, only exp(-alpha relu(z_r - z_d) / z0 * m(w)) of the departing air's excess
    over the background arrives (alpha 2, z0 1000 m, m(w) = 1 - 0.5 sigmoid(w - 5)); the rest is
    lifted out of the boundary layer and replaced by background air from aloft. The product over
    sub-steps depends only on the total rise, so uphill transport is blocked the same way at any
    step size, and less so in strong wind.
    """
    cx, cy = u * dt / grid.dx, v * dt / grid.dy
    n_sub = max(1, int(np.ceil(max(np.abs(cx).max(), np.abs(cy).max()))))
    rows, cols = np.indices(grid.shape, dtype=np.float64)
    coords = np.stack([rows - cy / n_sub, cols - cx / n_sub])
    z_dep = ndimage.map_coordinates(elevation, coords, order=1, mode="nearest")
    modulation = wind_modulation(np.hypot(u, v))
    passing = np.exp(-BARRIER_ALPHA * np.clip(elevation - z_dep, 0.0, None) / BARRIER_Z0 * modulation)
    bg = background[:, None, None]
    out = conc - bg
    arrived = np.empty_like(out)
    for _ in range(n_sub):
        for s in range(out.shape[0]):
            ndimage.map_coordinates(out[s], coords, output=arrived[s], order=1, mode="constant", cval=0.0)
        out = passing * arrived
    return out + bg


def diffuse(conc: np.ndarray, grid: Grid, dt: float = DT, k: float = DIFFUSIVITY) -> np.ndarray:
    """One explicit step of dC/dt = K laplacian(C) (coefficients capped at 0.2 for stability)."""
    ax = np.minimum(k * dt / grid.dx**2, 0.2)
    ay = min(k * dt / grid.dy**2, 0.2)
    lap_x = ndimage.correlate1d(conc, [1.0, -2.0, 1.0], axis=-1, mode="nearest")
    lap_y = ndimage.correlate1d(conc, [1.0, -2.0, 1.0], axis=-2, mode="nearest")
    return conc + ax * lap_x + ay * lap_y


@dataclass
class Weather:
    """Surface meteorology at one hour (all (n_lat, n_lon), latitude ascending)."""

    u: np.ndarray  # m s-1
    v: np.ndarray
    temp: np.ndarray  # K
    rh: np.ndarray  # %
    psfc: np.ndarray  # Pa
    mix_depth: np.ndarray  # m, daily maximum mixed-layer depth H
    blh: np.ndarray  # m, boundary-layer height h(t)
    sun: np.ndarray  # cos(zenith), >= 0


class Simulation:
    """Hour-by-hour simulation; `run(times)` yields the surface fields at the requested times."""

    def __init__(self, grid: Grid, surface: Surface, origin: pd.Timestamp, hours: float, seed: int):
        self.grid, self.surface, self.origin = grid, surface, origin
        self.systems = synoptic_schedule(grid, hours, np.random.default_rng([seed, 1]))
        self.conc = np.broadcast_to(BACKGROUND[:, None, None], (len(SPECIES), *grid.shape)).copy()
        land, wet, z = surface.land, surface.moisture, surface.elevation
        lat = grid.lat[:, None]
        north = np.clip(lat - 15.0, 0.0, None)
        self.coriolis = 2 * OMEGA * np.sin(np.deg2rad(lat))
        # time-independent parts of the climatology, so each hour costs a few array operations
        self.t_annual = 300.0 - 0.55 * north  # sea-level annual mean, K
        self.t_winter = (1.0 + 0.45 * north) * (0.4 + 0.6 * land)  # seasonal amplitude, larger inland
        self.t_diurnal = 0.8 + 5.0 * land * (1.2 - wet)  # diurnal amplitude, larger on dry land
        self.wet_annual = 0.25 + 0.55 * wet
        self.wet_summer = 0.2 * np.clip(north / 30.0, 0.0, 1.0) * (0.5 + 0.5 * wet)  # summer monsoon moisture
        self.friction = 0.55 + 0.35 * (1 - land)
        self.friction_day = 0.25 * land
        is_land = land >= 0.5
        self.mix_base = np.where(is_land, 450.0, 700.0)
        self.mix_warm = np.where(is_land, 800.0 * (1.5 - wet), 0.0)
        self.mix_wind = np.where(is_land, 60.0, 0.0)
        self.land_cell = is_land.astype(np.float64)
        self.lapse_drop = LAPSE * z
        self.emission = EMISSION_PER_PERSON[:, None, None] * surface.population[None] * 1e-6  # ug m-2 s-1
        self.ozone_uptake = 0.15 + 0.85 * land
        self.aridity = land * np.clip(0.45 - wet, 0.0, None) / 0.45
        self.heating = 1.0 / (1.0 + np.exp(-(lat - 33.0) / 2.0))  # coal heating north of ~33 N

    def streamfunction(self, time: pd.Timestamp) -> tuple[np.ndarray, np.ndarray]:
        """(synoptic psi, seasonal psi) in m2 s-1 at `time`."""
        s, g = self.systems, self.grid
        t = (time - self.origin) / pd.Timedelta(hours=1)
        age = t - s.start_h
        psi = np.zeros(g.shape)
        for k in np.flatnonzero((age >= 0) & (age < s.life_h)):
            secs = age[k] * 3600.0
            lat = s.lat0[k] + np.rad2deg(s.speed_v[k] * secs / R_EARTH)
            lon = s.lon0[k] + np.rad2deg(s.speed_u[k] * secs / (R_EARTH * np.cos(np.deg2rad(lat))))
            envelope = np.sin(np.pi * age[k] / s.life_h[k]) ** 2
            psi += gaussian_streamfunction(g, lat, lon, s.radius[k], s.vmax[k] * envelope)
        w = winter_index(time)
        # Siberian high (winter) <-> thermal low over the plateau / NW India (summer): the monsoon
        seasonal = gaussian_streamfunction(g, 48.0 - 7.5 * (1 - w), 100.0 - 10.0 * (1 - w), 2.5e6, 6.0 * w)
        return psi, seasonal

    def weather(self, time: pd.Timestamp) -> Weather:
        g, sf = self.grid, self.surface
        w = winter_index(time)
        lat = g.lat[:, None]
        psi_syn, psi_season = self.streamfunction(time)
        psi = psi_syn + psi_season
        dpsi_dx, dpsi_dy = g.gradient(psi)
        jet_lat = 38.0 - 6.0 * w  # westerly jet: south in winter, north in summer
        u = (6.0 + 2.0 * w) * np.exp(-(((lat - jet_lat) / 9.0) ** 2)) - 1.5 * (1 + w) * np.exp(-(((lat - 15.0) / 6.0) ** 2))
        u = u - dpsi_dy
        v = dpsi_dx
        hour = local_hour(g, time)
        day = np.clip(np.sin(np.pi * (hour - 7.0) / 11.0), 0.0, None)  # 0 at night, 1 at ~12:30 local
        friction = self.friction + self.friction_day * day  # daytime mixing brings momentum down
        turn = np.deg2rad(20.0)  # Ekman turning toward low pressure (NH: anticlockwise)
        us = friction * (u * np.cos(turn) - v * np.sin(turn))
        vs = friction * (u * np.sin(turn) + v * np.cos(turn))
        us, vs = deflect_by_terrain(us, vs, sf.slope_x, sf.slope_y)
        speed = np.hypot(us, vs)

        t_sea = self.t_annual - self.t_winter * w + 0.4 * v  # warm advection in southerlies
        temp_mean = t_sea - self.lapse_drop
        temp = temp_mean + self.t_diurnal * np.cos(2 * np.pi * (hour - 15.0) / 24.0)
        psfc = barometric_pressure(P_SEA + RHO_AIR * self.coriolis * psi, t_sea, sf.elevation)
        wet = np.clip(self.wet_annual - w * self.wet_summer + 0.01 * v, 0.05, 0.97)
        rh = np.clip(wet * relative_humidity_from_dewpoint(temp - 273.15, temp_mean - 273.15), 2.0, 100.0)

        mix = self.mix_base + self.mix_warm * (0.5 * (1 - w)) + self.mix_wind * speed
        night = np.minimum(120.0 + 40.0 * speed, mix)
        blh = mix - (mix - night) * (1.0 - day) * self.land_cell
        return Weather(us, vs, temp, rh, psfc, mix, blh, cos_zenith(g, time))

    def emissions(self, time: pd.Timestamp, wx: Weather) -> np.ndarray:
        """Emission fluxes (species, y, x) in ug m-2 s-1 at `time`."""
        w = winter_index(time)
        hour = local_hour(self.grid, time)
        traffic = 0.6 + 0.8 * np.clip(np.sin(np.pi * (hour - 5.0) / 16.0), 0.0, None)
        heating = 1.0 + 1.5 * max(w, 0.0) * self.heating
        flux = self.emission.copy()
        flux[[0, 2, 4]] *= heating  # coal heating: primary PM2.5, SO2, CO
        flux[[3, 4]] *= traffic
        spring = 1.0 + 1.5 * np.exp(-(((time.day_of_year - 100) / 35.0) ** 2))
        dust = 2.0 * np.clip(np.hypot(wx.u, wx.v) - 6.0, 0.0, None) ** 2 * self.aridity * spring
        flux[0] += 0.15 * dust
        flux[1] += 0.85 * dust
        return flux

    def chemistry(self, wx: Weather, flux: np.ndarray) -> None:
        """Sources, chemistry and sinks for one hour on the mixed-layer mean state (in place)."""
        c = self.conc
        fresh = flux * DT / wx.mix_depth  # ug m-3 added over the mixed layer
        c += fresh
        c[5] -= np.minimum(0.9 * c[5], 0.5 * fresh[3] * (1.0 - 0.5 * np.sqrt(wx.sun)))  # NO titrates O3
        rhf, tc = wx.rh / 100.0, wx.temp - 273.15
        d = c[2] * (1.0 - np.exp(-(1.5e-6 + 6e-6 * wx.sun + 1.2e-5 * rhf**4) * DT))  # SO2 -> sulfate
        c[2] -= d
        c[0] += 1.5 * d
        d = c[3] * (1.0 - np.exp(-(3e-6 + 2.5e-5 * wx.sun) * DT))  # NO2 + OH -> HNO3 -> nitrate
        c[3] -= d
        c[0] += 1.3 * d * rhf / (1.0 + np.exp((tc - 10.0) / 5.0))
        voc = np.sqrt(c[4] / 300.0)
        c[5] += 4.5e-4 * DT * wx.sun**1.5 * c[3] / (1.0 + c[3] / 60.0) * voc * np.clip((tc - 5.0) / 25.0, 0.0, 1.3)
        stable = np.sqrt(wx.mix_depth / wx.blh)
        loss = DRY_DEPOSITION[:, None, None] * stable / wx.mix_depth
        loss[5] *= self.ozone_uptake  # O3 deposits on vegetation, hardly on water
        wet = 2e-5 * np.clip((wx.rh - 80.0) / 20.0, 0.0, None) ** 2
        loss[[0, 1]] += wet
        loss[2] += 0.5 * wet
        c *= np.exp(-loss * DT)
        vent = wx.mix_depth / 1000.0 / (2 * 86400.0)  # exchange with the free troposphere
        bg = BACKGROUND[:, None, None]
        self.conc = bg + (c - bg) * np.exp(-vent * DT)

    def step(self, time: pd.Timestamp) -> Weather:
        """Advance the chemistry state by one hour ending at `time`; return that hour's weather."""
        wx = self.weather(time)
        self.chemistry(wx, self.emissions(time, wx))
        self.conc = diffuse(transport(self.conc, wx.u, wx.v, self.grid, self.surface.elevation), self.grid)
        return wx

    def surface_fields(self, wx: Weather) -> dict[str, np.ndarray]:
        """Model-named surface fields in canonical units (concentrations ug m-3, co mg m-3)."""
        stable = np.sqrt(wx.mix_depth / wx.blh)  # night: shallow stable layer concentrates emissions
        c = self.conc
        pm25, coarse = c[0] * stable, c[1] * stable
        return {
            "u": wx.u, "v": wx.v, "temp": wx.temp, "rh": wx.rh, "psfc": wx.psfc,
            "pm25": pm25, "pm10": pm25 + coarse, "so2": c[2] * stable, "no2": c[3] * stable,
            "co": c[4] * stable / 1000.0, "o3": c[5] / stable**0.7,
        }

    def run(self, times: pd.DatetimeIndex) -> Iterator[tuple[pd.Timestamp, dict[str, np.ndarray]]]:
        """Simulate hour by hour from the origin; yield the surface fields at each of `times`."""
        wanted = set(times)
        t, last = self.origin, times[-1]
        while t <= last:
            wx = self.step(t)
            if t in wanted:
                yield t, self.surface_fields(wx)
            t += pd.Timedelta(hours=1)
