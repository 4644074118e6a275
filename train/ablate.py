"""`python -m train ablate`: train every configured variant with every seed, tabulate val loss, evaluate
every run on the test split and test each variant against the control arm (`train.ablate_skill`).

Each (variant, seed) trains in its own run directory under ablate.run_dir, so an interrupted
ablation restarts where it stopped: finished runs are reused, a run with a last.ckpt resumes, a run
without one starts afresh (`fit`'s --resume rule); a run whose test report is newer than its best
checkpoint is not evaluated again.
The verdict compares against the reference experiment's criteria (baseline 0.3557, target < 0.32)
and against the no-physics arm of this very ablation, which is the comparison that transfers to
any dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from topoflow.errors import TrainingError
from topoflow.files import atomic_write_bytes, atomic_write_json
from train.ablate_skill import (Runs, compare, control_arm, evaluate_run, mean_std, significance_markdown,
                                skill_markdown, skill_table, strata_table, terrain_markdown, uphill_table, verdicts)
from train.config import ExperimentConfig, load_experiment_config
from train.distributed import DistEnv, init_distributed
from train.fit import fit

log = logging.getLogger("train")


def verdict(results: dict[str, list[float]], cfg: ExperimentConfig) -> str:
    """One line: the best variant against the reference criteria and against the first (control) arm."""
    a = cfg.ablate
    means = {name: mean_std(losses)[0] for name, losses in results.items()}
    best = min(means, key=means.get)
    control = control_arm(cfg)
    meets = "MEETS" if means[best] < a.target_val_loss else "does NOT meet"
    beats = "below" if means[best] < a.baseline_val_loss else "not below"
    gain = (means[control] - means[best]) / means[control] * 100 if means[control] else 0.0
    return (f"Verdict: best variant `{best}` (val loss {means[best]:.4f}) {meets} the reference target "
            f"< {a.target_val_loss} and is {beats} the reference baseline {a.baseline_val_loss}; "
            f"its val loss is {gain:.1f}% lower than `{control}`'s ({means[control]:.4f}).")


def table(results: dict[str, list[float]], seeds: list[int]) -> str:
    lines = ["| variant | val loss (mean +- std) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for name, losses in results.items():
        mean, std = mean_std(losses)
        lines.append(f"| {name} | {mean:.4f} +- {std:.4f} | " + " | ".join(f"{v:.4f}" for v in losses) + " |")
    return "\n".join(lines)


def ablate(config_path: Path, overrides: list[str], *, progress: bool = True, env: DistEnv | None = None) -> Path:
    """Run all variants x seeds; write ablation.md and ablation.json into ablate.run_dir; return the .md path."""
    env = env or init_distributed()
    cfg = load_experiment_config(config_path, overrides)
    root = Path(cfg.ablate.run_dir)
    results: dict[str, list[float]] = {}
    reports: Runs = {}
    for variant in cfg.ablate.variants:
        results[variant.name], reports[variant.name] = [], []
        for seed in cfg.ablate.seeds:
            run_dir = root / variant.name / f"seed{seed}"
            run_cfg = load_experiment_config(
                config_path, [*overrides, *variant.overrides, f"train.seed={seed}", f"train.run_dir={run_dir}"])
            log.info("ablation %s seed %d -> %s", variant.name, seed, run_dir)
            result = fit(run_cfg, resume=True, progress=progress, env=env)  # finished runs return at once
            if result.best_val_loss is None:
                raise TrainingError(f"ablation run {run_dir} produced no finite validation loss: see its train.log")
            results[variant.name].append(result.best_val_loss)
            reports[variant.name].append(evaluate_run(run_cfg, run_dir, progress=progress, env=env))
    md = root / "ablation.md"
    if env.is_main:
        write_summary(root, results, reports, cfg)
    return md


def write_summary(root: Path, results: dict[str, list[float]], reports: Runs, cfg: ExperimentConfig) -> None:
    """ablation.json and ablation.md: the val-loss table and verdict, the test-split skill table, the
    significance of each variant against the control and one verdict sentence per variant."""
    seeds, control = cfg.ablate.seeds, control_arm(cfg)
    skill, tests = skill_table(reports), compare(reports, control)
    test_verdicts = verdicts(tests, control, len(seeds))
    summary: dict[str, Any] = {
        "seeds": seeds,
        "val_loss": results,
        "mean_std": {k: mean_std(v) for k, v in results.items()},
        "verdict": verdict(results, cfg),
        "control": control,
        "test_skill": skill,
        "significance": tests,
        "test_verdicts": test_verdicts,
        "terrain_skill": strata_table(reports),
        "uphill_attention_share": uphill_table(reports),
    }
    sections = [f"# Ablation ({len(seeds)} seeds, best val loss per run)", table(results, seeds), summary["verdict"],
                skill_markdown(skill, len(seeds)), significance_markdown(tests, control),
                terrain_markdown(summary["terrain_skill"], summary["uphill_attention_share"], len(seeds)),
                "## Verdict on the test split", "\n".join(f"- {line}" for line in test_verdicts)]
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "ablation.json", summary, sort_keys=False)
    atomic_write_bytes(root / "ablation.md", ("\n\n".join(sections) + "\n").encode())
    print(table(results, seeds))
    print(summary["verdict"])
    print("\n".join(test_verdicts))
