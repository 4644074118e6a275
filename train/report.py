"""Figures and the Markdown skill report written by `python -m train evaluate`.

Matplotlib with the Agg backend (no display on HPC nodes); every function writes one PNG and
returns its path, so the report can link exactly the figures that exist. Maps are in degrees with
the land/sea boundary drawn from the store's own land mask (works offline); every axis says what it
shows and in which units, and figures use constrained layout so titles do not collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.baselines import SOURCES  # noqa: E402
from train.metrics import GB3095_LIMITS, exceedance_threshold  # noqa: E402

REFERENCES = ("persistence", "climatology")  # skill scores are against these
LON_LABEL, LAT_LABEL = "longitude (\u00b0E)", "latitude (\u00b0N)"
STYLES = dict(zip(SOURCES, ("o", "s", "^", "v", "d")))
COLOURS = dict(zip(SOURCES, ("C3", "C0", "C1", "C2", "C4")))


@dataclass(frozen=True)
class Grid:
    """Cell-centre coordinates (degrees, ascending) and the land mask a map's coastline is drawn from."""

    lat: np.ndarray
    lon: np.ndarray
    land: np.ndarray  # (H, W) bool

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """Outer cell edges, so imshow puts every cell centre on its coordinate."""
        lon, lat = _edges(self.lon), _edges(self.lat)
        return lon[0], lon[-1], lat[0], lat[-1]


def land_mask(loss_mask: np.ndarray, static: np.ndarray) -> np.ndarray:
    """Land: the loss mask (the land fraction over its threshold) where no static field (DEM) is no-data."""
    return np.asarray(loss_mask, bool) & np.isfinite(static).all(axis=0)


def _edges(centres: np.ndarray) -> np.ndarray:
    c = np.asarray(centres, dtype=float)
    step = c[1] - c[0] if c.size > 1 else 1.0
    return np.concatenate([c - step / 2, c[-1:] + step / 2])


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def _map(ax: plt.Axes, data: np.ndarray, grid: Grid, title: str, label: str, **kw: Any) -> None:
    """One field in degrees with its coastline, title and labelled colourbar."""
    im = ax.imshow(data, origin="lower", extent=grid.extent, aspect="auto", interpolation="nearest", **kw)
    if grid.land.any() and not grid.land.all():  # a contour of a constant field has no line
        ax.contour(grid.lon, grid.lat, grid.land.astype(float), levels=[0.5], colors="k", linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(LON_LABEL)
    ax.set_ylabel(LAT_LABEL)
    ax.figure.colorbar(im, ax=ax, label=label)


def _symmetric(*fields: np.ndarray) -> float:
    finite = np.concatenate([np.abs(f[np.isfinite(f)]) for f in fields])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _range(*fields: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([f[np.isfinite(f)] for f in fields])
    return tuple(np.percentile(values, [1, 99])) if values.size else (0.0, 1.0)


def plot_maps(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, grid: Grid, names: list[str],
              units: dict[str, str], title: str, path: Path) -> Path:
    """One row per pollutant: prediction, truth (shared colour scale) and error; off-mask cells blank."""
    fig, axes = plt.subplots(len(names), 3, figsize=(14, 3.2 * len(names)), squeeze=False, layout="constrained")
    for i, name in enumerate(names):
        p, t = np.where(mask[i], pred[i], np.nan), np.where(mask[i], truth[i], np.nan)
        lo, hi = _range(p, t)
        unit = units.get(name, "")
        _map(axes[i, 0], p, grid, f"{name} prediction", unit, vmin=lo, vmax=hi, cmap="viridis")
        _map(axes[i, 1], t, grid, f"{name} truth", unit, vmin=lo, vmax=hi, cmap="viridis")
        emax = _symmetric(p - t)
        _map(axes[i, 2], p - t, grid, f"{name} error (pred - truth)", unit, vmin=-emax, vmax=emax, cmap="RdBu_r")
    fig.suptitle(title)
    return _save(fig, path)


def best_reference(metrics: dict[str, Any], name: str, lead: int) -> str:
    """The reference forecast with the lowest RMSE for `name` at `lead` (persistence when none has a score)."""
    scored = [(metrics[s][name][str(lead)]["rmse"], s) for s in SOURCES[1:] if s in metrics]
    scored = [(rmse, s) for rmse, s in scored if rmse is not None]
    return min(scored)[1] if scored else "persistence"


def plot_error_maps(maps: dict[str, tuple[np.ndarray, np.ndarray]], reference: dict[str, str], grid: Grid,
                    names: list[str], units: dict[str, str], title: str, path: Path) -> Path:
    """Time-mean RMSE and bias per cell, model beside its best reference, one row per pollutant: where
    the model wins or loses, e.g. over mountains. `maps` holds (bias, rmse) per source, each (P, H, W)."""
    fig, axes = plt.subplots(len(names), 4, figsize=(18, 3.2 * len(names)), squeeze=False, layout="constrained")
    for i, name in enumerate(names):
        ref, unit = reference[name], units.get(name, "")
        (mb, mr), (rb, rr) = [(b[i], r[i]) for b, r in (maps["model"], maps[ref])]
        hi = _range(mr, rr)[1]
        _map(axes[i, 0], mr, grid, f"{name} RMSE, model", unit, vmin=0, vmax=hi, cmap="magma_r")
        _map(axes[i, 1], rr, grid, f"{name} RMSE, {ref}", unit, vmin=0, vmax=hi, cmap="magma_r")
        bmax = _symmetric(mb, rb)
        _map(axes[i, 2], mb, grid, f"{name} bias, model", unit, vmin=-bmax, vmax=bmax, cmap="RdBu_r")
        _map(axes[i, 3], rb, grid, f"{name} bias, {ref}", unit, vmin=-bmax, vmax=bmax, cmap="RdBu_r")
    fig.suptitle(title)
    return _save(fig, path)


def plot_rmse_by_lead(metrics: dict[str, Any], names: list[str], path: Path) -> Path:
    """RMSE against lead per pollutant, model vs persistence and the baselines present."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        for source in [s for s in SOURCES if s in metrics]:
            leads = sorted(metrics[source][name], key=int)
            ax.plot([int(lead) for lead in leads], [_nan(metrics[source][name][lead]["rmse"]) for lead in leads],
                    marker=STYLES[source], color=COLOURS[source], label=source)
        ax.set_title(name)
        ax.set_xlabel("lead (h)")
        ax.set_ylabel(f"RMSE ({metrics['units'][name]})")
    axes[0, 0].legend(fontsize=8)
    return _save(fig, path)


def plot_alphas(alphas: dict[str, np.ndarray], path: Path) -> Path:
    """The learned barrier strength alpha per physics block (one bar per head when per-head)."""
    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    labels, values = [], []
    for name, value in alphas.items():
        flat = np.asarray(value, dtype=float).ravel()
        labels += [name] if flat.size == 1 else [f"{name}[{h}]" for h in range(flat.size)]
        values += flat.tolist()
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("physics block")
    ax.set_ylabel("alpha (dimensionless)")
    ax.set_title("learned elevation-barrier strength")
    return _save(fig, path)


def plot_scan_order(order: np.ndarray, patch_elevation: np.ndarray, patch_grid: tuple[int, int],
                    regions: tuple[int, int], grid: Grid, title: str, path: Path) -> Path:
    """Consecutive tokens of each region joined by arrows over the patch elevation (upwind -> downwind)."""
    gh, gw = patch_grid
    rh, rw = gh // regions[0], gw // regions[1]
    rows, cols = np.divmod(np.asarray(order), gw)
    region = (rows // rh) * regions[1] + cols // rw
    same = region[1:] == region[:-1]
    lat_c, lon_c = grid.lat.reshape(gh, -1).mean(axis=1), grid.lon.reshape(gw, -1).mean(axis=1)  # patch centres
    x, y = lon_c[cols], lat_c[rows]
    fig, ax = plt.subplots(figsize=(10, 10 * gh / gw + 1), layout="constrained")
    im = ax.imshow(patch_elevation.reshape(gh, gw), origin="lower", cmap="terrain", extent=grid.extent, aspect="auto")
    fig.colorbar(im, ax=ax, label="patch elevation (m)")
    ax.quiver(x[:-1][same], y[:-1][same], (x[1:] - x[:-1])[same], (y[1:] - y[:-1])[same],
              angles="xy", scale_units="xy", scale=1, width=0.002, color="k")
    lat_e, lon_e = _edges(grid.lat), _edges(grid.lon)
    for r in range(0, gh + 1, rh):
        ax.axhline(lat_e[r * (len(grid.lat) // gh)], color="w", lw=0.8)
    for c in range(0, gw + 1, rw):
        ax.axvline(lon_e[c * (len(grid.lon) // gw)], color="w", lw=0.8)
    ax.set_title(title)
    ax.set_xlabel(LON_LABEL)
    ax.set_ylabel(LAT_LABEL)
    return _save(fig, path)


def taylor_stats(scores: dict[str, float | None]) -> tuple[float, float, float] | None:
    """(std ratio s_f / s_r, correlation R, centred RMS difference E' / s_r) of one forecast against the
    truth (Taylor 2001, JGR 106(D7) 7183-7192), with E'^2 = s_f^2 + s_r^2 - 2 s_f s_r R; None if undefined."""
    s_f, s_r, r = scores.get("std_pred"), scores.get("std_truth"), scores.get("corr")
    if s_f is None or r is None or not s_r:
        return None
    ratio = s_f / s_r
    return ratio, r, float(np.sqrt(max(ratio * ratio + 1.0 - 2.0 * ratio * r, 0.0)))


def _taylor_axes(ax: plt.Axes, rmax: float, negative: bool) -> None:
    """Correlation on the angle, normalised std on the radius, centred-RMS circles about the truth (1, 0)."""
    ax.set_thetamin(0)
    ax.set_thetamax(180 if negative else 90)
    ax.set_rlim(0, rmax)
    ax.set_rticks(np.arange(0.0, rmax, 0.5))
    ax.tick_params(axis="y", labelsize=7)
    ticks = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0])
    ticks = np.concatenate([-ticks[:0:-1], ticks]) if negative else ticks
    ax.set_thetagrids(np.degrees(np.arccos(ticks)), [f"{t:g}" for t in ticks], fontsize=7)
    theta, rad = np.meshgrid(np.linspace(0, np.pi, 181), np.linspace(0, rmax, 100))
    crms = ax.contour(theta, rad, np.sqrt(rad**2 + 1 - 2 * rad * np.cos(theta)), levels=[0.25, 0.5, 0.75, 1.0, 1.5],
                      colors="0.6", linestyles=":", linewidths=0.8)
    ax.clabel(crms, fontsize=6, fmt="%g")
    ax.plot(np.linspace(0, np.pi if negative else np.pi / 2, 100), np.ones(100), "k--", lw=0.6)
    ax.plot(0, 1, "k*", ms=10, label="truth", clip_on=False)
    ax.set_xlabel("std / std of truth (radius); correlation (angle)", fontsize=8)


def plot_taylor(metrics: dict[str, Any], names: list[str], lead: int, path: Path) -> Path:
    """A Taylor diagram at one lead, a panel per pollutant: every source's std ratio and correlation
    against the truth; the distance to the truth's star is the centred RMS difference over std of truth."""
    fig = plt.figure(figsize=(3.6 * len(names), 4.2), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1, projection="polar")
        points = {s: taylor_stats(metrics[s][name][str(lead)]) for s in SOURCES if s in metrics}
        points = {s: p for s, p in points.items() if p is not None}
        rmax = max([1.5] + [1.1 * p[0] for p in points.values()])
        _taylor_axes(ax, rmax, any(p[1] < 0 for p in points.values()))
        for source, (ratio, corr, _) in points.items():
            ax.plot(np.arccos(np.clip(corr, -1, 1)), ratio, STYLES[source], color=COLOURS[source], label=source)
        ax.set_title(f"{name} ({metrics['units'][name]})", fontsize=10)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"Taylor diagram, lead {lead} h (grey: centred RMS difference / std of truth)")
    return _save(fig, path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _nan(value: float | None) -> float:
    return np.nan if value is None else value


def skill_score(rmse: float | None, rmse_ref: float | None) -> float | None:
    """RMSE skill score 1 - RMSE / RMSE_ref: 1 perfect, 0 no better than the reference, < 0 worse."""
    if rmse is None or rmse_ref is None or rmse_ref == 0:
        return None
    return 1.0 - rmse / rmse_ref


NA_NOTE = ("n/a = no exceedance in the split: POD is n/a when no cell exceeded the threshold in the truth, FAR "
           "when no forecast exceeded it, CSI when neither did; the same for a score with no threshold, and for "
           "corr when a forecast or the truth does not vary.")


def threshold_line(name: str, units: str) -> str:
    """The exceedance threshold behind CSI/POD/FAR, with the limit it comes from."""
    threshold = exceedance_threshold(name, units)
    if threshold is None:
        return f"CSI/POD/FAR: no exceedance threshold for {name} in {units} (no GB 3095-2012 limit known)."
    limit, limit_units = GB3095_LIMITS[name]
    kind = "8-h limit (no 24-h O3 limit exists)" if name == "o3" else "24-h limit"
    return (f"CSI/POD/FAR: exceedance = value >= {threshold:g} {units} (GB 3095-2012 grade II {kind}, "
            f"{limit:g} {limit_units}).")


def markdown_report(metrics: dict[str, Any], info: dict[str, str], figures: list[Path]) -> str:
    """Skill tables (model, persistence and the baselines per pollutant and lead, with RMSE skill scores
    against persistence and climatology) and the figures."""
    lines = ["# Forecast skill report", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines.append("- skill score SS = 1 - RMSE / RMSE_reference (1 perfect, 0 no better than the reference, < 0 worse)")
    cols = ("rmse", "mae", "bias", "corr", "rmse_latw", "csi", "pod", "far")
    sources = [s for s in SOURCES if s in metrics]
    refs = [r for r in REFERENCES if r in metrics]
    for name, by_lead in metrics["model"].items():
        head = " | ".join([*cols, *(f"SS vs {r}" for r in refs)])
        lines += ["", f"## {name} ({metrics['units'][name]})", "",
                  f"| lead (h) | source | {head} |", "|---|---|" + "---|" * (len(cols) + len(refs))]
        for lead in sorted(by_lead, key=int):
            for source in sources:
                row = metrics[source][name][lead]
                scores = [skill_score(row["rmse"], metrics[r][name][lead]["rmse"]) for r in refs]
                cells = [_fmt(row[c]) for c in cols] + ["n/a" if s is None else f"{s:.3f}" for s in scores]
                lines.append(f"| {lead} | {source} | " + " | ".join(cells) + " |")
        lines += ["", threshold_line(name, metrics["units"][name]), NA_NOTE]
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"
