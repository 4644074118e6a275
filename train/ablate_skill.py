"""Test-split skill of an ablation: evaluate every run, tabulate mean +- std over seeds, test each variant.

Val loss ranks runs but says nothing about which pollutants and leads gain, nor whether a gain is more than
seed noise and weather luck. So every (variant, seed) run's best checkpoint is evaluated on the test split
(`train.evaluate`, into the run's `report/`; skipped when its metrics.json is newer than the checkpoint),
skill scores SS = 1 - RMSE / RMSE_reference are formed against persistence (and climatology when
metrics.json has it), and each variant is tested against the control arm over test times with the
Diebold-Mariano test of `train.significance`, on the seed-mean per-time loss. That test is over test
times given the trained models: seed-to-seed (training) spread is not in its p-value, so read it beside the
table's +- std over seeds.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from train.config import ExperimentConfig
from train.distributed import DistEnv, broadcast_from_main
from train.evaluate import evaluate
from train.rundir import default_checkpoint
from train.significance import diebold_mariano
from train.time_errors import ERRORS_FILE, TimeMSE, load_time_mse

log = logging.getLogger("train")
METRICS = ("rmse", "mae", "bias", "corr")
REFERENCES = ("persistence", "climatology")  # skill-score references, each used when metrics.json holds it
UPHILL_KEYS = ("with_bias", "without_bias", "uniform")
STRATA_STATS = ("rmse", "bias", "ss_persistence")  # the per-stratum table's columns
ALPHA = 0.05
Runs = dict[str, list[Path]]  # variant -> its runs' report folders, in seed order


def control_arm(cfg: ExperimentConfig) -> str:
    """The arm every variant is tested against: the variant named `control`, else the first one."""
    names = [v.name for v in cfg.ablate.variants]
    return "control" if "control" in names else names[0]


def _fresh(out: Path, ckpt: Path) -> bool:
    metrics = out / "metrics.json"
    return (metrics.is_file() and (out / ERRORS_FILE).is_file()
            and metrics.stat().st_mtime > ckpt.stat().st_mtime)


def evaluate_run(run_cfg: ExperimentConfig, run_dir: Path, *, progress: bool, env: DistEnv) -> Path:
    """Evaluate the run's best checkpoint on the test split into run_dir/report (unless that is already
    newer than the checkpoint); return the report folder."""
    ckpt, out = default_checkpoint(run_dir), run_dir / "report"
    if broadcast_from_main(_fresh(out, ckpt)):
        log.info("ablation: %s is up to date with %s, not re-evaluated", out / "metrics.json", ckpt.name)
        return out
    test_cfg = run_cfg.model_copy(update={"evaluate": run_cfg.evaluate.model_copy(update={"split": "test"})})
    evaluate(test_cfg, checkpoint=ckpt, output=out, progress=progress, env=env)
    return out


def _value(entry: dict[str, Any], key: str) -> float:
    v = entry.get(key)
    return math.nan if v is None else float(v)


def _run_skill(metrics: dict[str, Any], pollutant: str, lead: str) -> dict[str, float]:
    """One run's metrics at (pollutant, lead), plus its skill score against each reference it holds."""
    model = metrics["model"][pollutant][lead]
    row = {m: _value(model, m) for m in METRICS}
    for ref in REFERENCES:
        if ref in metrics:
            ref_rmse = _value(metrics[ref][pollutant][lead], "rmse")
            row[f"ss_{ref}"] = 1.0 - row["rmse"] / ref_rmse if ref_rmse > 0 else math.nan
    return row


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value) over seeds."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _seed_table(seeds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """pollutant -> lead -> stat -> (mean, std) over the seeds' scores (each source -> pollutant -> lead);
    a stat missing in any seed is dropped."""
    table: dict[str, Any] = {}
    for pollutant, by_lead in seeds[0]["model"].items():
        table[pollutant] = {}
        for lead in by_lead:
            rows = [_run_skill(m, pollutant, lead) for m in seeds]
            keys = [k for k in rows[0] if all(k in r for r in rows)]
            table[pollutant][lead] = {k: mean_std([r[k] for r in rows]) for k in keys}
    return table


def _seed_metrics(outs: list[Path]) -> list[dict[str, Any]]:
    return [json.loads((out / "metrics.json").read_text()) for out in outs]


def skill_table(runs: Runs) -> dict[str, dict[str, dict[str, dict[str, tuple[float, float]]]]]:
    """variant -> pollutant -> lead -> stat -> (mean, std) over seeds; a stat missing in any seed is dropped."""
    return {variant: _seed_table(_seed_metrics(outs)) for variant, outs in runs.items()}


def strata_table(runs: Runs) -> dict[str, dict[str, Any]]:
    """variant -> terrain stratum -> pollutant -> lead -> stat -> (mean, std) over seeds, from metrics.json's
    `strata` (train.stratified); a variant with a run evaluated before strata existed is left out."""
    table: dict[str, Any] = {}
    for variant, outs in runs.items():
        seeds = _seed_metrics(outs)
        if all("strata" in m for m in seeds):
            table[variant] = {s: _seed_table([m["strata"]["skill"][s] for m in seeds])
                              for s in seeds[0]["strata"]["skill"]}
    return table


def uphill_table(runs: Runs) -> dict[str, dict[str, tuple[float, float]]]:
    """variant -> uphill attention share with / without bias and of uniform attention -> (mean, std) over seeds
    (metrics.json's `diagnostics.uphill_attention_share`; NaN where not measured, e.g. with bias and physics off)."""
    table: dict[str, Any] = {}
    for variant, outs in runs.items():
        shares = [m.get("diagnostics", {}).get("uphill_attention_share") for m in _seed_metrics(outs)]
        if all(shares):
            table[variant] = {k: mean_std([_value(s, k) for s in shares]) for k in UPHILL_KEYS}
    return table


def seed_mean_mse(outs: list[Path]) -> TimeMSE:
    """Per-time lat-weighted MSE averaged over seeds, at the times every seed evaluated."""
    loaded = [load_time_mse(out / ERRORS_FILE) for out in outs]
    times = loaded[0].times
    for run in loaded[1:]:
        times = np.intersect1d(times, run.times)
    mse = np.mean([run.mse[np.isin(run.times, times)] for run in loaded], axis=0)
    return TimeMSE(times, mse, loaded[0].targets, loaded[0].leads_h)


def _nanmean(a: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """nanmean where an all-NaN slice (a lead past the split's end) is NaN by design, without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _test(control: np.ndarray, variant: np.ndarray) -> dict[str, float]:
    """DM test on the times where both losses exist, and the variant's mean change in % of the control's loss."""
    ok = np.isfinite(control) & np.isfinite(variant)
    res = diebold_mariano(control[ok], variant[ok])
    base = float(control[ok].mean()) if ok.any() else math.nan
    lower = 100.0 * res.mean_diff / base if base > 0 else math.nan
    return {"p_value": res.p_value, "statistic": res.statistic, "lower_pct": lower, "times": res.n}


def normalised_loss(mse: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per-time loss over all pollutants and leads: each (pollutant, lead)'s MSE in units of the control's
    time-mean MSE there (so mg m-3 CO and ug m-3 PM weigh alike), averaged over the ones with a target."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return _nanmean(mse / scale, axis=(1, 2))


def compare(runs: Runs, control: str) -> dict[str, dict[str, Any]]:
    """Each variant against the control arm, on seed-mean per-time losses at their common test times:
    overall (normalised MSE over pollutants and leads) and per pollutant and lead."""
    ref = seed_mean_mse(runs[control])
    out: dict[str, dict[str, Any]] = {}
    for variant, outs in runs.items():
        if variant == control:
            continue
        other = seed_mean_mse(outs)
        times = np.intersect1d(ref.times, other.times)
        c, v = ref.mse[np.isin(ref.times, times)], other.mse[np.isin(other.times, times)]
        scale = _nanmean(c, axis=0)
        per_target = {p: {lead: _test(c[:, pi, li], v[:, pi, li]) for li, lead in enumerate(ref.leads_h)}
                      for pi, p in enumerate(ref.targets)}
        out[variant] = {"overall": _test(normalised_loss(c, scale), normalised_loss(v, scale)),
                        "per_target": per_target}
    return out



def verdicts(tests: dict[str, dict[str, Any]], control: str, n_seeds: int) -> list[str]:
    """One sentence per variant: significant or not at ALPHA, the p-value and the mean change of the test MSE."""
    lines = []
    for variant, result in tests.items():
        o = result["overall"]
        if not math.isfinite(o["p_value"]):
            lines.append(f"`{variant}` vs control `{control}`: untestable, only {o['times']} common test times "
                         "(the Diebold-Mariano test needs 3 or more).")
            continue
        word = "significant" if o["p_value"] < ALPHA else "not significant"
        way = "lower" if o["lower_pct"] >= 0 else "higher"
        lines.append(f"`{variant}` vs control `{control}`: {word} at {ALPHA:g} "
                     f"(Diebold-Mariano p = {o['p_value']:.3g}, {o['times']} test times, seed mean of {n_seeds}): "
                     f"its test MSE (normalised per pollutant and lead by the control's) is "
                     f"{abs(o['lower_pct']):.2f}% {way} than the control's.")
    return lines


def _cell(stat: tuple[float, float]) -> str:
    return f"{stat[0]:.4g} +- {stat[1]:.2g}"


def skill_markdown(table: dict[str, Any], n_seeds: int) -> str:
    """The test-split table: one row per variant, pollutant and lead; mean +- std over seeds."""
    flat = [(v, p, lead, row) for v, by_p in table.items() for p, by_lead in by_p.items()
            for lead, row in by_lead.items()]
    stats = list(dict.fromkeys(k for *_, row in flat for k in row))
    head = [f"## Test split, mean +- std over {n_seeds} seeds", "",
            "| variant | pollutant | lead h | " + " | ".join(s.replace("ss_", "SS vs ") for s in stats) + " |",
            "|---|---|---|" + "---|" * len(stats)]
    rows = [f"| {v} | {p} | {lead} | " + " | ".join(_cell(row[s]) if s in row else "n/a" for s in stats) + " |"
            for v, p, lead, row in flat]
    return "\n".join(head + rows)


def significance_markdown(tests: dict[str, dict[str, Any]], control: str) -> str:
    """Per pollutant and lead: the variant's test MSE change against the control (+ = lower) and its DM p-value."""
    if not tests:
        return ""
    leads = list(next(iter(next(iter(tests.values()))["per_target"].values())))
    lines = [f"## Against control `{control}`: test MSE lower by (%), Diebold-Mariano p", "",
             "| variant | pollutant | " + " | ".join(f"{h} h" for h in leads) + " |", "|---|---|" + "---|" * len(leads)]
    for variant, result in tests.items():
        for p, by_lead in result["per_target"].items():
            cells = [f"{t['lower_pct']:+.2f}% (p={t['p_value']:.3g})" for t in by_lead.values()]
            lines.append(f"| {variant} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _maybe(stat: tuple[float, float] | None) -> str:
    return "n/a" if stat is None or not math.isfinite(stat[0]) else _cell(stat)


def terrain_markdown(strata: dict[str, Any], uphill: dict[str, Any], n_seeds: int) -> str:
    """Per terrain stratum (mountain, basin, plain): RMSE, bias and SS vs persistence, mean +- std over seeds,
    and per variant the share of physics-block attention crossing more than 1,000 m uphill."""
    lines = []
    if uphill:
        lines += [f"## Attention crossing > 1,000 m uphill (physics block), mean +- std over {n_seeds} seeds", "",
                  "| variant | " + " | ".join(k.replace("_", " ") for k in UPHILL_KEYS) + " |",
                  "|---|" + "---|" * len(UPHILL_KEYS)]
        lines += [f"| {v} | " + " | ".join(_maybe(row[k]) for k in UPHILL_KEYS) + " |" for v, row in uphill.items()]
        lines.append("")
    if strata:
        lines += [f"## Test split by terrain stratum, mean +- std over {n_seeds} seeds", "",
                  "| variant | stratum | pollutant | lead h | " + " | ".join(
                      s.replace("ss_", "SS vs ") for s in STRATA_STATS) + " |", "|---|---|---|---|" + "---|" * len(STRATA_STATS)]
        lines += [f"| {v} | {s} | {p} | {lead} | " + " | ".join(_maybe(row.get(k)) for k in STRATA_STATS) + " |"
                  for v, by_s in strata.items() for s, by_p in by_s.items() for p, by_lead in by_p.items()
                  for lead, row in by_lead.items()]
    return "\n".join(lines)
