"""Reference forecasts the model must beat, scored beside it by `python -m train evaluate`.

Persistence alone is a weak bar at long leads, so three stronger, physics- or statistics-only
competitors join it, each forecasting the targets at valid time t + lead from what is known at t:

- `climatology`: the train-period mean of each (month, hour of day), per cell and pollutant, at the
  valid time's month and hour; a month the train period lacks falls back to the hour-of-day mean
  over the whole train period (the demo trains on Oct-Jan and tests on March).
- `diurnal_persistence`: the value at the valid time's hour of day on the latest day known at t,
  i.e. at t + lead - 24 h * ceil(lead / 24 h) (one day before the valid time for leads up to 24 h;
  for longer leads t + lead - 24 h lies after t, so a forecast cannot use it). Read from the feature
  store by time, because a sample holds only its input time's fields.
- `advection`: the field at t moved by the 10 m wind at t over the lead, one semi-Lagrangian step
  (Staniforth & Cote 1991, Mon. Wea. Rev. 119, 2206-2223): the value at each arrival cell x is
  the field bilinearly interpolated at the departure point x - u * lead; a cell whose departure
  point lies outside the domain keeps persistence.

Where a baseline has no value (a time missing from the store or the train period) it is NaN and
the cell is left out of that baseline's scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from pipeline.records import StoreRecord
from pipeline.shard import split_index
from pipeline.store import open_features
from topoflow.errors import StoreError
from topoflow.files import sha256_json
from train.batch import Batch
from train.shards import ShardSet

BASELINES = ("climatology", "diurnal_persistence", "advection")
SOURCES = ("model", "persistence", *BASELINES)  # every forecast scored in metrics.json, in table order
EARTH_RADIUS_M = 6.371e6


def advect(field: torch.Tensor, u: torch.Tensor, v: torch.Tensor, lat: torch.Tensor, spacing_deg: tuple[float, float],
           lead_h: float) -> torch.Tensor:
    """`field` (B, C, H, W) at t moved by the wind u, v (B, H, W; m/s, east/north) over `lead_h` hours.

    Rows grow northward (`lat` (H,) ascending, degrees), columns eastward; `spacing_deg` is (dlat, dlon).
    Metres become cells with the grid spacing, and with cos(lat) for longitude.
    """
    _, _, h, w = field.shape
    seconds = lead_h * 3600.0
    cell_y = EARTH_RADIUS_M * math.radians(spacing_deg[0])
    cell_x = EARTH_RADIUS_M * math.radians(spacing_deg[1]) * torch.cos(torch.deg2rad(lat.to(field)))[:, None]
    rows = torch.arange(h, device=field.device, dtype=field.dtype)[:, None] - v * seconds / cell_y
    cols = torch.arange(w, device=field.device, dtype=field.dtype)[None, :] - u * seconds / cell_x
    inside = (rows >= 0) & (rows <= h - 1) & (cols >= 0) & (cols <= w - 1)
    grid = torch.stack([2 * cols / max(w - 1, 1) - 1, 2 * rows / max(h - 1, 1) - 1], dim=-1)  # x, y in [-1, 1]
    moved = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return torch.where(inside[:, None], moved, field)


def diurnal_lag_h(lead_h: int) -> int:
    """Hours between the diurnal-persistence source time and the valid time: whole days, never after t."""
    return 24 * math.ceil(lead_h / 24)


def _month_hour(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Month (1..12) and hour (0..23) of datetime64 `times`; -1 for NaT."""
    stamp = times.astype("datetime64[h]")
    bad = np.isnat(stamp)
    month = (stamp.astype("datetime64[M]").astype(np.int64) % 12) + 1
    hour = (stamp - stamp.astype("datetime64[D]")).astype(np.int64)
    return np.where(bad, -1, month), np.where(bad, -1, hour)


@dataclass(frozen=True)
class Climatology:
    """Train-period means by (month, hour) and by hour alone, (K | 24, P, H, W), NaN where unseen."""

    keys: np.ndarray  # (K,) sorted month * 24 + hour of each row of `means`
    means: np.ndarray
    hour_means: np.ndarray

    @classmethod
    def from_fields(cls, fields: xr.DataArray) -> "Climatology":
        """From `fields` (time, var, lat, lon) of the train period, NaN at invalid times."""
        month, hour = _month_hour(fields["time"].values)
        fields = fields.astype(np.float64).assign_coords(key=("time", month * 24 + hour), hour=("time", hour))
        by_key = fields.groupby("key").mean("time").compute()
        by_hour = fields.groupby("hour").mean("time").compute()
        hour_means = np.full((24, *fields.shape[1:]), np.nan, dtype=np.float32)
        hour_means[by_hour["hour"].values] = by_hour.values
        return cls(by_key["key"].values, by_key.values.astype(np.float32), hour_means)

    def months(self) -> list[int]:
        return sorted({int(k) // 24 for k in self.keys})

    def forecast(self, valid: np.ndarray) -> np.ndarray:
        """(B, P, H, W) climatology at datetime64 `valid` (B,); NaN for NaT."""
        month, hour = _month_hour(valid)
        key = month * 24 + hour
        pos = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        found = self.keys[pos] == key
        out = self.hour_means[hour]  # fancy indexing copies; hour -1 (NaT) is overwritten below
        out[found] = self.means[pos[found]]
        out[hour < 0] = np.nan
        return out


class StoreTargets:
    """The target fields of the feature store, read by time (lazily, per batch)."""

    def __init__(self, ds: xr.Dataset, targets: list[str]) -> None:
        self.time = ds["time"].values
        self.valid = ds["valid"].values.astype(bool)
        self.fields = ds["fields"].sel(var=targets)

    def at(self, times: np.ndarray) -> np.ndarray:
        """(B, P, H, W) float32 at datetime64 `times` (B,); NaN where a time is not in the store, invalid, or NaT."""
        pos = np.minimum(np.searchsorted(self.time, times), len(self.time) - 1)
        found = (self.time[pos] == times) & self.valid[pos]
        out = np.full((len(times), *self.fields.shape[1:]), np.nan, dtype=np.float32)
        if found.any():
            unique, inverse = np.unique(pos[found], return_inverse=True)
            out[found] = self.fields.isel(time=unique).values[inverse]
        return out


def open_matching_store(path: str | Path, shards: ShardSet) -> tuple[xr.Dataset, StoreRecord]:
    """The feature store the shard set was written from; another store would give baselines on other data."""
    ds, record = open_features(path)
    if sha256_json(record.model_dump(mode="json")) != shards.manifest.plan.store_fingerprint:
        raise StoreError(f"feature store {path} is not the one shard set {shards.root} was written from "
                         f"({shards.manifest.store_path}): point data.store at that store, or re-shard with "
                         "`python -m pipeline shard --config CONFIG`")
    return ds, record


class Baselines:
    """The three baselines of one evaluation: climatology computed once, store reads per batch."""

    def __init__(self, ds: xr.Dataset, record: StoreRecord, shards: ShardSet) -> None:
        """`ds`, `record`: the store the shard set was written from (`open_matching_store`)."""
        train = split_index(ds["time"].values, record, "train")
        fields = ds["fields"].sel(var=shards.targets).isel(time=train)
        self.climatology = Climatology.from_fields(fields.where(ds["valid"].isel(time=train)))
        self.history = StoreTargets(ds, shards.targets)
        dynamic = record.names("dynamic")
        self.wind_index = [dynamic.index(name) for name in record.wind]
        self.wind_mean = shards.stats_mean[self.wind_index].astype(np.float32)
        self.wind_std = shards.input_std[self.wind_index].astype(np.float32)
        self.lat = torch.as_tensor(shards.lat, dtype=torch.float32)
        self.spacing = (_spacing(shards.lat, "latitude"), _spacing(shards.lon, "longitude"))

    def describe(self) -> str:
        """One line for the report: what each baseline is and what the climatology covers."""
        return (f"climatology = train-period mean by (month, hour), months {self.climatology.months()} "
                "(other months: hour-of-day mean); diurnal_persistence = value at t + lead - 24 h * ceil(lead / 24 h); "
                "advection = field at t moved by the wind at t (semi-Lagrangian, bilinear)")

    def forecasts(self, batch: Batch, persistence: np.ndarray, lead_h: int) -> dict[str, np.ndarray]:
        """(B, P, H, W) forecasts in physical units of every baseline at `lead_h`; `persistence` is the
        batch's targets at t in physical units, `batch.x` its normalised input (any device)."""
        t = np.array(batch.times, dtype="datetime64[ns]")  # "" (padding) -> NaT
        valid = t + np.timedelta64(lead_h, "h")
        mean = torch.as_tensor(self.wind_mean, device=batch.x.device)[None, :, None, None]
        std = torch.as_tensor(self.wind_std, device=batch.x.device)[None, :, None, None]
        wind = batch.x[:, self.wind_index].float() * std + mean
        state = torch.as_tensor(persistence, device=batch.x.device)
        moved = advect(state, wind[:, 0], wind[:, 1], self.lat.to(state.device), self.spacing, lead_h)
        return {"climatology": self.climatology.forecast(valid),
                "diurnal_persistence": self.history.at(valid - np.timedelta64(diurnal_lag_h(lead_h), "h")),
                "advection": moved.cpu().numpy()}


def _spacing(coord: np.ndarray, name: str) -> float:
    """The (regular) grid spacing of `coord` in degrees; advection needs one cell size."""
    steps = np.diff(np.asarray(coord, dtype=np.float64))
    if steps.size == 0 or steps[0] <= 0 or not np.allclose(steps, steps[0], rtol=1e-4):
        raise StoreError(f"the {name} coordinate is not a regular ascending grid with more than one point "
                         "(advection needs one cell size): rebuild the store on a regular lat/lon domain")
    return float(steps[0])
