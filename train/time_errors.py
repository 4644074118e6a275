"""Per-test-time errors of a forecast (`errors.npz` beside metrics.json).

metrics.json holds split-wide sums; a paired significance test between two models over test times needs
each time's error. For every evaluated sample time this keeps, per pollutant and lead, the lat-weighted
squared-error sum and the weight sum over the valid cells, so a time's lat-weighted MSE is sse / weight.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np

from topoflow.errors import OutputError
from topoflow.files import atomic_write_bytes
from train.distributed import all_gather

ERRORS_FILE = "errors.npz"


class TimeErrors:
    """Per-time (sse, weight) rows, (2, pollutants, leads) each, keyed by the sample's ISO time."""

    def __init__(self, targets: list[str], leads_h: list[int]) -> None:
        self.targets, self.leads_h = list(targets), list(leads_h)
        self.rows: dict[str, np.ndarray] = {}

    def update(self, times: list[str], valid: np.ndarray, lead_index: int, pred: np.ndarray, truth: np.ndarray,
               mask: np.ndarray, lat_w: np.ndarray) -> None:
        """Add one lead of a batch: pred/truth/mask (B, P, H, W) in physical units, lat_w (H, 1)."""
        w = np.where(mask, lat_w, 0.0)
        sse = (np.where(mask, (pred - truth) ** 2, 0.0) * w).sum(axis=(-2, -1), dtype=np.float64)
        wsum = w.sum(axis=(-2, -1), dtype=np.float64)
        for b in np.flatnonzero(valid):
            row = self.rows.setdefault(times[b], np.zeros((2, len(self.targets), len(self.leads_h))))
            row[0, :, lead_index], row[1, :, lead_index] = sse[b], wsum[b]

    def gathered(self) -> "TimeErrors":
        """Every rank's rows merged (each sample is evaluated by exactly one rank)."""
        out = TimeErrors(self.targets, self.leads_h)
        for rows in all_gather(self.rows):
            out.rows.update(rows)
        return out

    def save(self, path: Path) -> None:
        """errors.npz, written atomically: times (T,), sse and weight (T, P, L), targets, leads_h; times sorted."""
        times = sorted(self.rows)
        stacked = np.stack([self.rows[t] for t in times]) if times else np.zeros((0, 2, len(self.targets),
                                                                                     len(self.leads_h)))
        buf = io.BytesIO()
        np.savez(buf, times=np.array(times, dtype=str), sse=stacked[:, 0], weight=stacked[:, 1],
                 targets=np.array(self.targets, dtype=str), leads_h=np.array(self.leads_h, dtype=np.int64))
        atomic_write_bytes(Path(path), buf.getvalue())


class TimeMSE(NamedTuple):
    """Per-time lat-weighted MSE (T, P, L), NaN where a time has no valid cell; times sorted."""

    times: np.ndarray
    mse: np.ndarray
    targets: list[str]
    leads_h: list[str]


def load_time_mse(path: Path) -> TimeMSE:
    """The per-time MSE held by an errors.npz."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            times, sse, weight = npz["times"], npz["sse"], npz["weight"]
            targets, leads = npz["targets"].tolist(), [str(h) for h in npz["leads_h"].tolist()]
    except (OSError, KeyError, ValueError) as exc:
        raise OutputError(f"cannot read per-time errors {path}: {exc}; delete it and rerun `python -m train ablate` "
                          "(or `python -m train evaluate`) to rewrite it") from exc
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = np.where(weight > 0, sse / np.where(weight > 0, weight, 1.0), np.nan)
    return TimeMSE(times, mse, targets, leads)
