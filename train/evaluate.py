"""`python -m train evaluate`: skill of a checkpoint on the test split, against persistence and the
stronger baselines of `train.baselines` (climatology, diurnal persistence, advection).

Three steps: `load` (checkpoint, shard set, network, loader), `accumulate` (every batch and lead into
running sums, merged across ranks) and `report` (metrics.json, report.md, figures). Persistence
forecasts the value at the input time for every lead; a model that cannot beat it has learned
nothing useful. Everything is in physical units (denormalised with the manifest's train-period
statistics) over the cells on the loss mask with a valid target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model import ModelConfig
from topoflow.errors import CheckpointError
from topoflow.files import atomic_write_bytes, atomic_write_json, writing
from topoflow.progress import progress_bar
from train.attention_probe import UphillProbe
from train.baselines import SOURCES, Baselines, open_matching_store
from train.checkpoint import check_data, load_checkpoint
from train.config import ExperimentConfig
from train.distributed import DistEnv, all_gather, all_reduce_sum, init_distributed
from train.loader import ShardStream, loader_workers
from train.logs import setup_logging
from train.metrics import ErrorMaps, SkillAccumulator, exceedance_threshold
from train.net import build_model, check_shards
from train.report import (Grid, best_reference, land_mask, markdown_report, plot_alphas, plot_error_maps, plot_maps,
                          plot_rmse_by_lead, plot_scan_order, plot_taylor)
from train.rundir import check_run_id, default_checkpoint
from train.shards import load_shard_set
from train.step import StepContext, forward
from train.stratified import StratifiedSkill, load_strata, strata_markdown
from train.threads import use_rank_threads
from train.time_errors import ERRORS_FILE, TimeErrors

log = logging.getLogger("train")
Skill = dict[str, dict[str, dict[int, SkillAccumulator]]]  # source -> pollutant -> lead -> sums


@dataclass
class Evaluation:
    """A checkpoint ready to evaluate: its network (eval mode), step context and loader."""

    path: Path
    ckpt: dict[str, Any]
    model_cfg: ModelConfig
    net: nn.Module
    ctx: StepContext
    loader: ShardStream
    n_batches: int
    baselines: Baselines
    strata: StratifiedSkill  # per-terrain-stratum skill sums, filled by `accumulate`
    probe: UphillProbe  # uphill attention share of the physics block, measured by `accumulate`


def load(cfg: ExperimentConfig, checkpoint: Path | None, env: DistEnv) -> Evaluation:
    """Read the shard set and the checkpoint (default: evaluate.checkpoint, else this run's best in
    train.run_dir) and set up."""
    shards = load_shard_set(cfg.data.shards)
    check_shards(cfg.data, shards)
    chosen = checkpoint or cfg.evaluate.checkpoint
    run_dir = Path(cfg.train.run_dir)
    path = Path(chosen or default_checkpoint(run_dir))
    ckpt = load_checkpoint(path)
    if chosen is None:
        check_run_id(ckpt, run_dir, path)
    check_data(ckpt, cfg.data, path)
    model_cfg = ModelConfig.model_validate(ckpt["config"]["model"])  # the architecture it was trained with
    residual = bool(ckpt["config"]["train"]["residual"])
    if residual and ckpt.get("residual_scale") is None:
        raise CheckpointError(f"checkpoint {path} was trained with train.residual but holds no residual_scale "
                              "(written by an older version): retrain it with `python -m train fit`")
    net = build_model(model_cfg, shards).to(env.device)
    net.load_state_dict(ckpt["model"])
    net.eval()
    ctx = StepContext.create(shards, model_cfg.scan, residual, cfg.train.precision, env.device,
                             ckpt.get("residual_scale"))
    split = cfg.evaluate.split
    loader = ShardStream(cfg.data.shards, split, cfg.train.eval_batch_size, mode="eval", rank=env.rank,
                         world_size=env.world_size, strict=cfg.train.strict_data,
                         num_workers=loader_workers(shards, split, env.world_size, cfg.train.num_workers))
    log.info("evaluating %s (step %s) on the %s split", path, ckpt.get("step"), split)
    n_batches = min(len(loader), cfg.evaluate.max_batches or len(loader))
    store, record = open_matching_store(cfg.data.store, shards)
    return Evaluation(path, ckpt, model_cfg, net, ctx, loader, n_batches, Baselines(store, record, shards),
                      StratifiedSkill(load_strata(store, shards), shards),
                      UphillProbe(net, shards.patch_elevation, model_cfg.scan))


def _map_sample(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, batch: Any, ev: Evaluation) -> dict[str, Any]:
    order = batch.order_for(ev.model_cfg.scan)
    return {"pred": pred[0], "truth": truth[0], "mask": mask[0], "time": batch.times[0],
            "order": np.arange(ev.ctx.shards.layout.n_tokens) if order is None else order[0].cpu().numpy()}


@torch.no_grad()
def accumulate(ev: Evaluation, map_lead: int, progress: bool, errors: TimeErrors,
               maps: ErrorMaps) -> tuple[Skill, dict[str, Any], int]:
    """Running skill sums of the model, persistence and the baselines, one sample drawn at `map_lead`, and the
    number of real samples seen (this rank); the model's per-time errors go into `errors`, every source's
    per-cell error sums at `map_lead` into `maps`."""
    shards, ctx = ev.ctx.shards, ev.ctx
    units = shards.record.units
    skill: Skill = {src: {p: {lead: SkillAccumulator(exceedance_threshold(p, units[p])) for lead in shards.leads_h}
                          for p in shards.targets} for src in SOURCES}
    t_mean = torch.as_tensor(shards.target_mean, device=ctx.device).view(1, -1, 1, 1)
    t_std = torch.as_tensor(shards.target_std, device=ctx.device).view(1, -1, 1, 1)
    lat_w = ctx.lat_w.cpu().numpy()[:, None]
    sample: dict[str, Any] = {}
    evaluated = 0
    with progress_bar(ev.n_batches, desc="evaluate", unit="batch", log=log, enabled=progress) as bar:
        for i, batch in enumerate(ev.loader):
            if i >= ev.n_batches:
                break
            evaluated += int(batch.valid.sum())
            batch = batch.to(ctx.device)
            persistence = (batch.x[:, shards.target_index] * t_std + t_mean).cpu().numpy()
            for li, lead in enumerate(shards.leads_h):
                ev.probe.arm(batch, li)
                with ctx.autocast():
                    norm = forward(ev.net, batch, ctx, batch.lead_times[li].expand(batch.x.shape[0]))
                pred = (norm.float() * t_std + t_mean).cpu().numpy()
                truth = (batch.y[:, li] * t_std + t_mean).cpu().numpy()
                mask = batch.mask[:, li].cpu().numpy()
                errors.update(batch.times, batch.valid.cpu().numpy(), li, pred, truth, mask, lat_w)
                forecasts = {"model": pred, "persistence": persistence,
                             **ev.baselines.forecasts(batch, persistence, lead)}
                for pi, name in enumerate(shards.targets):
                    for src, fc in forecasts.items():  # a baseline without a value (NaN) leaves the cell out
                        ok = mask[:, pi] & np.isfinite(fc[:, pi])
                        skill[src][name][lead].update(fc[:, pi], truth[:, pi], ok, lat_w)
                        ev.strata.update(src, name, lead, fc[:, pi], truth[:, pi], ok, lat_w)
                        if lead == map_lead:
                            maps.update(src, pi, fc[:, pi], truth[:, pi], ok)
                if lead == map_lead and not sample and bool(batch.valid[0]):
                    sample = _map_sample(pred, truth, mask, batch, ev)
            bar.update(1)
    return skill, sample, evaluated


def coverage(ev: Evaluation, evaluated: int, split: str, capped: bool) -> dict[str, Any]:
    """How much of the split the skill covers (merged across ranks): samples expected and evaluated, and
    the corrupt shards skipped (strict_data False); a gap is logged as a warning and shown in the report."""
    total = sum(entry.count for entry in ev.ctx.shards.shards(split))
    evaluated = int(all_reduce_sum(torch.tensor([evaluated], dtype=torch.int64, device=ev.ctx.device)).item())
    skipped = sorted(set().union(*all_gather(sorted(ev.loader.skipped_shards))))
    out = {"split": split, "samples": total, "evaluated": evaluated, "skipped_shards": skipped,
           "capped_by_max_batches": capped}
    if skipped or (evaluated < total and not capped):
        log.warning("only %d of %d %s samples were evaluated; skipped corrupt shard(s): %s (rewrite them with "
                    "`python -m pipeline shard --config CONFIG`, or set train.strict_data to make this an error)",
                    evaluated, total, split, skipped or "none")
    return out


def metrics_of(skill: Skill, units: dict[str, str], device: torch.device) -> dict[str, Any]:
    """DESIGN.md's metrics.json shape, from sums merged across ranks."""
    metrics: dict[str, Any] = {src: {} for src in skill}
    for src, by_name in skill.items():
        for name, by_lead in by_name.items():
            metrics[src][name] = {}
            for lead, acc in by_lead.items():
                acc.load_vector(all_reduce_sum(torch.as_tensor(acc.as_vector(), device=device)).cpu().numpy())
                metrics[src][name][str(lead)] = acc.result()
    metrics["units"] = {name: units[name] for name in next(iter(skill.values()))}
    return metrics


def _figures(ev: Evaluation, metrics: dict[str, Any], sample: dict[str, Any], maps: ErrorMaps, map_lead: int,
             alphas: dict[str, np.ndarray], out_dir: Path) -> list[Path]:
    """Every figure of the report, in report order."""
    shards = ev.ctx.shards
    names, units = shards.targets, shards.record.units
    grid = Grid(shards.lat, shards.lon, land_mask(shards.loss_mask, shards.static))
    reference = {name: best_reference(metrics, name, map_lead) for name in names}
    figures = [
        plot_maps(sample["pred"], sample["truth"], sample["mask"], grid, names, units,
                  f"{sample['time']} + {map_lead} h", out_dir / f"maps_lead{map_lead}h.png"),
        plot_error_maps({src: maps.result(src) for src in {"model", *reference.values()}}, reference, grid, names,
                        units, f"time-mean error at lead {map_lead} h, model vs the best reference",
                        out_dir / f"error_maps_lead{map_lead}h.png"),
        plot_rmse_by_lead(metrics, names, out_dir / "rmse_by_lead.png"),
        *[plot_taylor(metrics, names, lead, out_dir / f"taylor_lead{lead}h.png") for lead in shards.leads_h],
    ]
    if alphas:
        figures.append(plot_alphas(alphas, out_dir / "alpha.png"))
    figures.append(plot_scan_order(sample["order"], shards.patch_elevation, shards.layout.patch_grid,
                                   shards.layout.regions, grid, f"scan order ({ev.model_cfg.scan}) at {sample['time']}",
                                   out_dir / "scan_order.png"))
    return figures


def report(ev: Evaluation, metrics: dict[str, Any], sample: dict[str, Any], maps: ErrorMaps, map_lead: int,
           out_dir: Path, split: str) -> Path:
    """metrics.json, the figures and report.md in `out_dir`; returns report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics, sort_keys=False)
    alphas = {k: v.detach().cpu().numpy() for k, v in ev.net.physics_alphas().items()}
    figures = _figures(ev, metrics, sample, maps, map_lead, alphas, out_dir)
    physics = "on" if ev.model_cfg.physics.enabled else "off"
    info = {
        "checkpoint": str(ev.path),
        "step": str(ev.ckpt.get("step")),
        "split": f"{split} ({ev.n_batches} batches of {ev.loader.batch_size})",
        "samples": _coverage_line(metrics["data"]),
        "model": f"scan={ev.model_cfg.scan}, physics={physics}, residual={ev.ctx.scale is not None}",
        "learned alpha": ", ".join(f"{k}={np.round(v, 3).tolist()}" for k, v in alphas.items()) or "n/a (physics off)",
        "baselines": ev.baselines.describe(),
    }
    path = out_dir / "report.md"
    terrain = strata_markdown(metrics["strata"], metrics["diagnostics"]["uphill_attention_share"])
    atomic_write_bytes(path, (markdown_report(metrics, info, figures) + terrain).encode())
    return path


def _coverage_line(data: dict[str, Any]) -> str:
    line = f"{data['evaluated']} of {data['samples']} evaluated"
    if data["skipped_shards"]:
        return f"**{line}: corrupt shard(s) {', '.join(data['skipped_shards'])} were skipped (strict_data off)**"
    return line + (" (capped by evaluate.max_batches)" if data["capped_by_max_batches"] else "")


def evaluate(cfg: ExperimentConfig, *, checkpoint: Path | None = None, output: Path | None = None,
             progress: bool = True, env: DistEnv | None = None) -> Path:
    """Evaluate a checkpoint on evaluate.split; returns the path of report.md (written by rank 0)."""
    env = env or init_distributed()
    setup_logging(Path(cfg.train.run_dir), env.is_main)
    use_rank_threads(cfg.train.threads)
    ev = load(cfg, checkpoint, env)
    map_lead = min(ev.ctx.shards.leads_h, key=lambda lead: abs(lead - cfg.evaluate.map_lead_h))
    errors = TimeErrors(ev.ctx.shards.targets, ev.ctx.shards.leads_h)
    maps = ErrorMaps(SOURCES, (len(ev.ctx.shards.targets), *ev.ctx.shards.loss_mask.shape))
    skill, sample, evaluated = accumulate(ev, map_lead, progress and env.is_main, errors, maps)
    metrics = metrics_of(skill, ev.ctx.shards.record.units, env.device)
    maps.load_vector(all_reduce_sum(torch.as_tensor(maps.as_vector(), device=env.device)).cpu().numpy())
    metrics["data"] = coverage(ev, evaluated, cfg.evaluate.split, ev.n_batches < len(ev.loader))
    metrics["strata"] = ev.strata.summary({s: metrics_of(by_src, ev.ctx.shards.record.units, env.device)
                                           for s, by_src in ev.strata.skill.items()})
    probe = all_reduce_sum(torch.as_tensor(ev.probe.as_vector(), device=env.device)).cpu().numpy()
    metrics["diagnostics"] = {"uphill_attention_share": ev.probe.result(probe, ev.net.has_physics)}
    errors = errors.gathered()
    out_dir = Path(output or cfg.evaluate.output or Path(cfg.train.run_dir) / "report")
    if not env.is_main:
        return out_dir / "report.md"
    with writing(out_dir, "then rerun evaluate"):
        path = report(ev, metrics, sample, maps, map_lead, out_dir, cfg.evaluate.split)
        errors.save(out_dir / ERRORS_FILE)  # per-time errors for `ablate`'s significance test
        return path
