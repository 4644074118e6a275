"""Figures and the Markdown skill report written by `python -m train evaluate`.

Matplotlib with the Agg backend (no display on HPC nodes); every function writes one PNG and
returns its path, so the report can link exactly the figures that exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.baselines import SOURCES  # noqa: E402

REFERENCES = ("persistence", "climatology")  # skill scores are against these


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_maps(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, lat: np.ndarray, lon: np.ndarray,
              names: list[str], units: dict[str, str], title: str, path: Path) -> Path:
    """One row per pollutant: prediction, truth (shared colour scale) and error; off-mask cells blank."""
    n = len(names)
    fig, axes = plt.subplots(n, 3, figsize=(13, 2.8 * n), squeeze=False)
    extent = (lon[0], lon[-1], lat[0], lat[-1])
    for i, name in enumerate(names):
        p = np.where(mask[i], pred[i], np.nan)
        t = np.where(mask[i], truth[i], np.nan)
        lo, hi = np.nanpercentile(np.concatenate([p.ravel(), t.ravel()]), [1, 99]) if np.isfinite(t).any() else (0, 1)
        err = p - t
        emax = float(np.nanmax(np.abs(err))) if np.isfinite(err).any() else 1.0
        for j, (data, label, kw) in enumerate([
            (p, "prediction", {"vmin": lo, "vmax": hi, "cmap": "viridis"}),
            (t, "truth", {"vmin": lo, "vmax": hi, "cmap": "viridis"}),
            (err, "error (pred - truth)", {"vmin": -emax, "vmax": emax, "cmap": "RdBu_r"}),
        ]):
            ax = axes[i, j]
            im = ax.imshow(data, origin="lower", extent=extent, aspect="auto", **kw)
            ax.set_title(f"{name} {label}", fontsize=9)
            fig.colorbar(im, ax=ax, label=units.get(name, ""))
    fig.suptitle(title)
    return _save(fig, path)


def plot_rmse_by_lead(metrics: dict[str, Any], names: list[str], path: Path) -> Path:
    """RMSE against lead per pollutant, model vs persistence and the baselines present."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    styles = ("o-", "s--", "^:", "v:", "d:")
    for ax, name in zip(axes[0], names):
        for source, style in zip([s for s in SOURCES if s in metrics], styles):
            leads = sorted(metrics[source][name], key=int)
            ax.plot([int(lead) for lead in leads], [_nan(metrics[source][name][lead]["rmse"]) for lead in leads], style,
                    label=source)
        ax.set_title(name)
        ax.set_xlabel("lead (h)")
    axes[0, 0].set_ylabel("RMSE")
    axes[0, 0].legend()
    return _save(fig, path)


def plot_alphas(alphas: dict[str, np.ndarray], path: Path) -> Path:
    """The learned barrier strength alpha per physics block (one bar per head when per-head)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    labels, values = [], []
    for name, value in alphas.items():
        flat = np.asarray(value, dtype=float).ravel()
        labels += [name] if flat.size == 1 else [f"{name}[{h}]" for h in range(flat.size)]
        values += flat.tolist()
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("alpha")
    ax.set_title("learned elevation-barrier strength")
    return _save(fig, path)


def plot_scan_order(order: np.ndarray, patch_elevation: np.ndarray, patch_grid: tuple[int, int],
                    regions: tuple[int, int], title: str, path: Path) -> Path:
    """Consecutive tokens of each region joined by arrows over the patch elevation (upwind -> downwind)."""
    gh, gw = patch_grid
    rh, rw = gh // regions[0], gw // regions[1]
    rows, cols = np.divmod(np.asarray(order), gw)
    region = (rows // rh) * regions[1] + cols // rw
    same = region[1:] == region[:-1]
    fig, ax = plt.subplots(figsize=(10, 10 * gh / gw + 1))
    im = ax.imshow(patch_elevation.reshape(gh, gw), origin="lower", cmap="terrain")
    fig.colorbar(im, ax=ax, label="patch elevation (m)")
    ax.quiver(cols[:-1][same], rows[:-1][same], (cols[1:] - cols[:-1])[same], (rows[1:] - rows[:-1])[same],
              angles="xy", scale_units="xy", scale=1, width=0.002, color="k")
    for r in range(0, gh + 1, rh):
        ax.axhline(r - 0.5, color="w", lw=0.8)
    for c in range(0, gw + 1, rw):
        ax.axvline(c - 0.5, color="w", lw=0.8)
    ax.set_title(title)
    ax.set_xlabel("patch column (east)")
    ax.set_ylabel("patch row (north)")
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
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"
