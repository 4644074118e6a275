"""`python -m train evaluate`: skill of a checkpoint on the test split, against persistence.

Persistence forecasts the value at the input time for every lead; a model that cannot beat it has
learned nothing useful. Everything is computed in physical units (denormalised with the manifest's
train-period statistics) over the cells that are on the loss mask and have a valid target.
Outputs in one folder: metrics.json (DESIGN.md's shape), report.md and PNG figures.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from model import ModelConfig
from train.checkpoint import CheckpointError, check_same_grid, default_checkpoint, load_checkpoint
from train.config import ExperimentConfig
from train.data import ShardStream, load_static
from train.distributed import DistEnv, all_reduce_sum, init_distributed
from train.fit import autocast, forward, loader_workers, setup_logging
from train.loss import latitude_weights
from train.metrics import SkillAccumulator, exceedance_threshold
from train.net import build_model, check_shards_match
from train.report import markdown_report, plot_alphas, plot_maps, plot_rmse_by_lead, plot_scan_order

log = logging.getLogger("train")
SOURCES = ("model", "persistence")


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def evaluate(cfg: ExperimentConfig, *, checkpoint: Path | None = None, output: Path | None = None,
             progress: bool = True, env: DistEnv | None = None) -> Path:
    """Evaluate `checkpoint` (default: evaluate.checkpoint, else the best in train.run_dir); returns report.md."""
    env = env or init_distributed()
    ecfg = cfg.evaluate
    path = Path(checkpoint or ecfg.checkpoint or default_checkpoint(Path(cfg.train.run_dir)))
    out_dir = Path(output or ecfg.output or Path(cfg.train.run_dir) / "report")
    setup_logging(Path(cfg.train.run_dir), env.is_main)
    ckpt = load_checkpoint(path)
    check_same_grid(ckpt, cfg.data.model_dump(mode="json"), path)
    static = load_static(cfg.data.shards)
    check_shards_match(cfg.data, static)
    model_cfg = ModelConfig.model_validate(ckpt["config"]["model"])  # the architecture it was trained with
    residual = bool(ckpt["config"]["train"]["residual"])
    scale = ckpt.get("residual_scale")
    if residual and scale is None:
        raise CheckpointError(f"checkpoint {path} was trained with train.residual but holds no residual_scale "
                              "(written by an older version): retrain it with `python -m train fit`")
    net = build_model(model_cfg, static).to(env.device)
    net.load_state_dict(ckpt["model"])
    net.eval()
    log.info("evaluating %s (step %s) on the %s split", path, ckpt.get("step"), ecfg.split)

    loader = ShardStream(cfg.data.shards, ecfg.split, cfg.train.eval_batch_size, mode="eval", rank=env.rank,
                         world_size=env.world_size,
                         num_workers=loader_workers(static, ecfg.split, env.world_size, cfg.train.num_workers))
    targets, leads = list(static.targets), list(static.leads_h)
    units = {v.name: v.units for v in cfg.data.variables}
    acc = {src: {p: {lead: SkillAccumulator(exceedance_threshold(p, units[p])) for lead in leads} for p in targets}
           for src in SOURCES}
    t_mean = torch.as_tensor(static.target_mean, device=env.device).view(1, -1, 1, 1)
    t_std = torch.as_tensor(static.target_std, device=env.device).view(1, -1, 1, 1)
    channels = static.target_index
    lat_w = latitude_weights(static.lat).numpy()[:, None]
    map_lead = min(leads, key=lambda lead: abs(lead - ecfg.map_lead_h))
    sample: dict[str, Any] = {}
    n_batches = min(len(loader), ecfg.max_batches or len(loader))
    with torch.no_grad():
        for i, batch in enumerate(tqdm(loader, total=n_batches, desc="evaluate", disable=not (env.is_main and progress))):
            if i >= n_batches:
                break
            batch = batch.to(env.device)
            persistence = (batch.x[:, channels] * t_std + t_mean).cpu().numpy()
            for li, lead in enumerate(leads):
                with autocast(env, cfg.train.precision):
                    norm = forward(net, batch, static, model_cfg.scan, scale, batch.lead_times[li].expand(batch.x.shape[0]))
                pred = (norm.float() * t_std + t_mean).cpu().numpy()
                truth = (batch.y[:, li] * t_std + t_mean).cpu().numpy()
                mask = batch.mask[:, li].cpu().numpy()
                for pi, name in enumerate(targets):
                    for src, fc in (("model", pred), ("persistence", persistence)):
                        acc[src][name][lead].update(fc[:, pi], truth[:, pi], mask[:, pi], lat_w)
                if lead == map_lead and not sample and bool(batch.valid[0]):
                    sample = {"pred": pred[0], "truth": truth[0], "mask": mask[0], "time": batch.times[0],
                              "order": batch.order_for(model_cfg.scan)}
                    sample["order"] = (np.arange(len(static.patch_elevation)) if sample["order"] is None
                                       else sample["order"][0].cpu().numpy())

    metrics: dict[str, Any] = {src: {} for src in SOURCES}
    for src in SOURCES:
        for name in targets:
            metrics[src][name] = {}
            for lead in leads:
                a = acc[src][name][lead]
                a.load_vector(all_reduce_sum(torch.as_tensor(a.as_vector(), device=env.device)).cpu().numpy())
                metrics[src][name][str(lead)] = a.result()
    metrics["units"] = {name: units[name] for name in targets}
    if not env.is_main:
        return out_dir / "report.md"

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(metrics, out_dir / "metrics.json")
    figures = [
        plot_maps(sample["pred"], sample["truth"], sample["mask"], static.lat, static.lon, targets, units,
                  f"{sample['time']} + {map_lead} h", out_dir / f"maps_lead{map_lead}h.png"),
        plot_rmse_by_lead(metrics, targets, out_dir / "rmse_by_lead.png"),
    ]
    alphas = {k: v.detach().cpu().numpy() for k, v in net.physics_alphas().items()}
    if alphas:
        figures.append(plot_alphas(alphas, out_dir / "alpha.png"))
    gh, gw = static.grid[0] // static.patch_size, static.grid[1] // static.patch_size
    figures.append(plot_scan_order(sample["order"], static.patch_elevation, (gh, gw), tuple(static.regions),
                                   f"scan order ({model_cfg.scan}) at {sample['time']}", out_dir / "scan_order.png"))
    info = {
        "checkpoint": str(path),
        "step": str(ckpt.get("step")),
        "split": f"{ecfg.split} ({n_batches} batches of {cfg.train.eval_batch_size})",
        "model": f"scan={model_cfg.scan}, physics={'on' if model_cfg.physics.enabled else 'off'}, residual={residual}",
        "learned alpha": ", ".join(f"{k}={np.round(v, 3).tolist()}" for k, v in alphas.items()) or "n/a (physics off)",
    }
    report = out_dir / "report.md"
    report.write_text(markdown_report(metrics, info, figures))
    return report
