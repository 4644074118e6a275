"""Forecast skill in physical units, accumulated batch by batch from sufficient statistics.

A test split does not fit in memory at full size, so every metric is a function of running sums
(count, sum of errors, of squares, cross products, contingency counts) merged across batches and
ranks. Exceedance thresholds: China GB 3095-2012 grade-II 24-h limits (O3 uses the 8-h limit as a
proxy because the standard has no 24-h O3 limit).
"""

from __future__ import annotations

import math

import numpy as np

# (limit, units it is stated in)
GB3095_LIMITS: dict[str, tuple[float, str]] = {
    "pm25": (75.0, "ug m-3"),
    "pm10": (150.0, "ug m-3"),
    "so2": (150.0, "ug m-3"),
    "no2": (80.0, "ug m-3"),
    "co": (4.0, "mg m-3"),
    "o3": (160.0, "ug m-3"),
}
# factor that converts a concentration in the key's units to ug m-3
_TO_UG_M3 = {"ug m-3": 1.0, "ug/m3": 1.0, "mg m-3": 1e3, "mg/m3": 1e3, "kg m-3": 1e9}
METRIC_NAMES = ("rmse", "mae", "bias", "corr", "rmse_latw", "csi", "pod", "far", "std_pred", "std_truth")
_SUMS = ("n", "err", "abs", "sq", "w", "wsq", "p", "t", "pp", "tt", "pt", "hits", "misses", "false_alarms")


def exceedance_threshold(pollutant: str, units: str) -> float | None:
    """The GB 3095-2012 limit of `pollutant` expressed in `units`; None if it has no limit or the units are unknown."""
    if pollutant not in GB3095_LIMITS or units not in _TO_UG_M3:
        return None
    limit, limit_units = GB3095_LIMITS[pollutant]
    return limit * _TO_UG_M3[limit_units] / _TO_UG_M3[units]


class SkillAccumulator:
    """Running sums for one (pollutant, lead) pair; `update` with flat arrays, `result` at the end."""

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold
        self.sums = dict.fromkeys(_SUMS, 0.0)

    def update(self, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray, weight: np.ndarray) -> None:
        """Add the cells where `valid`; arrays broadcast to one shape, `weight` is the latitude weight."""
        pred, truth, valid, weight = np.broadcast_arrays(pred, truth, valid, weight)
        p = pred[valid].astype(np.float64)
        t = truth[valid].astype(np.float64)
        w = weight[valid].astype(np.float64)
        e = p - t
        s = self.sums
        s["n"] += p.size
        s["err"] += e.sum()
        s["abs"] += np.abs(e).sum()
        s["sq"] += (e * e).sum()
        s["w"] += w.sum()
        s["wsq"] += (w * e * e).sum()
        s["p"] += p.sum()
        s["t"] += t.sum()
        s["pp"] += (p * p).sum()
        s["tt"] += (t * t).sum()
        s["pt"] += (p * t).sum()
        if self.threshold is not None:
            obs, fc = t >= self.threshold, p >= self.threshold
            s["hits"] += np.sum(obs & fc)
            s["misses"] += np.sum(obs & ~fc)
            s["false_alarms"] += np.sum(~obs & fc)

    def merge(self, other: "SkillAccumulator") -> None:
        for key in _SUMS:
            self.sums[key] += other.sums[key]

    def as_vector(self) -> np.ndarray:
        """The sums in a fixed order, for an all-reduce across ranks."""
        return np.array([self.sums[k] for k in _SUMS], dtype=np.float64)

    def load_vector(self, vec: np.ndarray) -> None:
        self.sums = {k: float(v) for k, v in zip(_SUMS, vec)}

    def result(self) -> dict[str, float | None]:
        """rmse, mae, bias (pred - truth), Pearson corr, lat-weighted rmse, CSI/POD/FAR and the (population)
        standard deviations of forecast and truth that a Taylor diagram needs (None when undefined)."""
        s = self.sums
        n = s["n"]
        if n == 0:
            return dict.fromkeys(METRIC_NAMES)
        cov = s["pt"] / n - (s["p"] / n) * (s["t"] / n)
        var_p = max(s["pp"] / n - (s["p"] / n) ** 2, 0.0)  # rounding can take a zero variance below 0
        var_t = max(s["tt"] / n - (s["t"] / n) ** 2, 0.0)
        out: dict[str, float | None] = {
            "rmse": math.sqrt(s["sq"] / n),
            "mae": s["abs"] / n,
            "bias": s["err"] / n,
            "corr": cov / math.sqrt(var_p * var_t) if var_p > 0 and var_t > 0 else None,
            "rmse_latw": math.sqrt(s["wsq"] / s["w"]) if s["w"] > 0 else None,
            "csi": None,
            "pod": None,
            "far": None,
            "std_pred": math.sqrt(var_p),
            "std_truth": math.sqrt(var_t),
        }
        if self.threshold is not None:
            h, m, f = s["hits"], s["misses"], s["false_alarms"]
            out["csi"] = h / (h + m + f) if h + m + f > 0 else None
            out["pod"] = h / (h + m) if h + m > 0 else None
            out["far"] = f / (h + f) if h + f > 0 else None
        return out


class ErrorMaps:
    """Per-cell running sums (count, error, squared error) per source and pollutant at one lead: the time-mean
    bias and RMSE maps, in O(sources x P x H x W) memory whatever the length of the split."""

    def __init__(self, sources: tuple[str, ...] | list[str], shape: tuple[int, int, int]) -> None:
        self.sources = list(sources)
        self.sums = np.zeros((len(self.sources), 3, *shape), dtype=np.float64)

    def update(self, source: str, index: int, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> None:
        """Add a batch (B, H, W) of pollutant `index`; cells not `valid` add nothing."""
        e = np.where(valid, pred.astype(np.float64) - truth, 0.0)
        sums = self.sums[self.sources.index(source), :, index]
        sums[0] += valid.sum(axis=0)
        sums[1] += e.sum(axis=0)
        sums[2] += (e * e).sum(axis=0)

    def as_vector(self) -> np.ndarray:
        """The sums flattened, for an all-reduce across ranks."""
        return self.sums.ravel()

    def load_vector(self, vec: np.ndarray) -> None:
        self.sums = np.asarray(vec, dtype=np.float64).reshape(self.sums.shape)

    def result(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(bias, rmse), each (P, H, W); NaN where a cell never had a valid value."""
        n, err, sq = self.sums[self.sources.index(source)]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, err / n, np.nan), np.where(n > 0, np.sqrt(sq / n), np.nan)
