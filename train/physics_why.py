"""Why the elevation barrier does or does not change skill: evidence from trained runs.

For each trained run with physics, at its last checkpoint, on the val split:
- `alpha_path`: alpha at the first and the last logged step (metrics.csv). A barrier that training
  does not move is either right at its initial value or not worth moving.
- `gradient`: dL/dalpha of the val loss, batch by batch (mean, std, and `agreement` = |mean| /
  mean |g|: 1 when every batch pushes alpha the same way, near 0 for noise), and Adam's step ratio
  |m| / sqrt(v) for alpha against the median over all other parameters. AdamW moves a parameter by
  about lr x that ratio per step whatever the gradient's size, so a small ratio means alpha's
  gradient keeps changing sign, not that it is small.
- `bias_vs_logits`: in each physics block, the spread (std) of the attention logits q.k / sqrt(d)
  against the bias: its mean over all (query, key) pairs, the share of pairs it pushes below -1
  (attention weight cut by more than e), and its mean on those pairs.
- `sensitivity`: the val loss with alpha multiplied by 0 (the barrier removed at inference), 1 and 2,
  the weights otherwise unchanged. If removing it barely changes the loss, the network does not
  rely on it: later blocks can route the same information around the barrier.

    .venv/bin/python -m train.physics_why --config configs/study.yaml \
        --runs runs/study-ablate/scan_barrier_uphill/seed0 ... --output benchmarks/results/physics_why.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from topoflow.files import atomic_write_bytes, atomic_write_json
from train.config import ExperimentConfig, TrainConfig, load_experiment_config
from train.distributed import init_distributed
from train.evaluate import Evaluation, load
from train.loss import weighted_mse
from train.optim import build_optimizer
from train.rundir import LAST
from train.step import forecasts_per_lead, forward, validate

log = logging.getLogger("train")
ALPHA_FACTORS = (0.0, 1.0, 2.0)
GRADIENT_BATCHES = 6


def alpha_path(run_dir: Path) -> dict[str, list[float]]:
    """{alpha column: [first logged value, last logged value]} from the run's metrics.csv."""
    with open(run_dir / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if any(v for k, v in r.items() if k.startswith("train_alpha"))]
    columns = [k for k in rows[0] if k.startswith("train_alpha")] if rows else []
    return {k.removeprefix("train_alpha_"): [float(rows[0][k]), float(rows[-1][k])] for k in columns}


def alphas(ev: Evaluation) -> list[torch.nn.Parameter]:
    return [blk.attn.physics.alpha for blk in ev.net.blocks if blk.attn.physics is not None]


def val_batches(ev: Evaluation, count: int | None = None) -> Iterator[Any]:
    for i, batch in enumerate(ev.loader):
        if count is not None and i >= count:
            return
        yield batch.to(ev.ctx.device)


def gradient(ev: Evaluation, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Per-batch dL/dalpha of the val loss (all leads) and AdamW's |m|/sqrt(v) for alpha vs the rest."""
    params = alphas(ev)
    grads = []
    for batch in val_batches(ev, GRADIENT_BATCHES):
        loss = sum(weighted_mse(preds, y, mask, ev.ctx.lat_w) for preds, y, mask in forecasts_per_lead(ev.net, batch, ev.ctx)
                   if mask.any())  # a lead past the split has no target
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).numpy())
    g = np.stack(grads)  # (batches, alpha values)
    opt = build_optimizer(ev.net, TrainConfig.model_validate(ckpt["config"]["train"]))
    opt.load_state_dict(ckpt["optimizer"])
    ratio = {id(p): (s["exp_avg"].abs() / (s["exp_avg_sq"].sqrt() + 1e-8)) for p, s in opt.state.items()}
    alpha_ids = {id(p) for p in params}
    others = torch.cat([r.flatten() for k, r in ratio.items() if k not in alpha_ids])
    return {"dloss_dalpha_mean": g.mean(0).tolist(), "dloss_dalpha_std": g.std(0).tolist(),
            "agreement": (np.abs(g.mean(0)) / np.abs(g).mean(0)).tolist(),
            "adam_step_ratio_alpha": torch.cat([ratio[id(p)].flatten() for p in params]).tolist(),
            "adam_step_ratio_median_others": float(others.median())}


class BiasProbe:
    """Forward pre-hooks on the physics blocks' attention: logits spread and bias size on one batch."""

    def __init__(self, ev: Evaluation) -> None:
        self.rows: dict[int, dict[str, float]] = {}
        self.handles = [blk.attn.register_forward_pre_hook(self._hook(i)) for i, blk in enumerate(ev.net.blocks)
                        if blk.attn.physics is not None]

    def _hook(self, index: int):
        def measure(attn: Any, args: tuple) -> None:
            if index in self.rows:
                return
            x, fields = args
            bsz, n, dim = x.shape
            q, k, _ = attn.qkv(x).reshape(bsz, n, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
            logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            bias = attn.physics.rows(attn.physics.operands(fields), 0, n).expand_as(logits)
            strong = bias < -1.0
            self.rows[index] = {"logit_std": float(logits.std()), "bias_mean": float(bias.mean()),
                                "share_below_minus_1": float(strong.float().mean()),
                                "bias_mean_where_below_minus_1": float(bias[strong].mean()) if strong.any() else 0.0}
        return measure

    def close(self) -> dict[str, dict[str, float]]:
        for handle in self.handles:
            handle.remove()
        return {f"blocks.{i}": row for i, row in sorted(self.rows.items())}


@torch.no_grad()
def bias_vs_logits(ev: Evaluation) -> dict[str, dict[str, float]]:
    probe = BiasProbe(ev)
    for batch in val_batches(ev, 1):
        forward(ev.net, batch, ev.ctx, batch.lead_times[:1].expand(batch.x.shape[0]))
    return probe.close()


@contextlib.contextmanager
def scaled_alphas(ev: Evaluation, factor: float) -> Iterator[None]:
    saved = [p.detach().clone() for p in alphas(ev)]
    with torch.no_grad():
        for p in alphas(ev):
            p.mul_(factor)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(alphas(ev), saved):
                p.copy_(value)


def sensitivity(ev: Evaluation) -> dict[str, float]:
    """Val loss with every alpha scaled by each of ALPHA_FACTORS."""
    out = {}
    for factor in ALPHA_FACTORS:
        with scaled_alphas(ev, factor):
            out[f"alpha_x{factor:g}"] = validate(ev.net, ev.loader, ev.ctx, None).loss
    return out


def diagnose(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Every measure above for one run (its last checkpoint, the val split)."""
    run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_dir": run_dir, "num_workers": 0}),
                                     "evaluate": cfg.evaluate.model_copy(update={"split": "val"})})
    ev = load(run_cfg, run_dir / LAST, init_distributed())
    if not alphas(ev):
        raise SystemExit(f"{run_dir} was trained without physics: there is no barrier to diagnose")
    ev.net.eval()
    return {"run": str(run_dir), "physics": ev.model_cfg.physics.model_dump(mode="json"), "alpha_path": alpha_path(run_dir),
            "gradient": gradient(ev, ev.ckpt), "bias_vs_logits": bias_vs_logits(ev), "sensitivity": sensitivity(ev)}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| run | alpha first -> last | dL/dalpha agreement | Adam step ratio alpha / others | logit std | "
             "bias mean | pairs < -1 | val loss alpha x0 / x1 / x2 |", "|---" * 8 + "|"]
    for r in results:
        path = "; ".join(f"{k} {a:.3f} -> {b:.3f}" for k, (a, b) in r["alpha_path"].items())
        g, s = r["gradient"], r["sensitivity"]
        ratio = statistics.median(g["adam_step_ratio_alpha"]) / g["adam_step_ratio_median_others"]
        blocks = r["bias_vs_logits"].values()
        lines.append(f"| {r['run']} | {path} | {statistics.median(g['agreement']):.2f} | {ratio:.2f} | "
                     + " / ".join(f"{b['logit_std']:.2f}" for b in blocks) + " | "
                     + " / ".join(f"{b['bias_mean']:.3f}" for b in blocks) + " | "
                     + " / ".join(f"{b['share_below_minus_1']:.1%}" for b in blocks) + " | "
                     + " / ".join(f"{s[f'alpha_x{f:g}']:.4f}" for f in ALPHA_FACTORS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--runs", nargs="+", required=True, type=Path, help="trained run directories with physics")
    parser.add_argument("--output", required=True, type=Path, help="JSON file; a .md table is written beside it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_experiment_config(args.config, [])
    results = [diagnose(cfg, run) for run in args.runs]
    atomic_write_json(args.output, results)
    atomic_write_bytes(args.output.with_suffix(".md"), markdown(results).encode())
    print(markdown(results))


if __name__ == "__main__":
    main()
