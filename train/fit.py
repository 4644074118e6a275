"""`python -m train fit`: the DDP training loop.

Step accounting: one optimiser step = `accumulate` micro-batches; an epoch is the loader's
`len()` (equal on every rank by construction) rounded down to whole optimiser steps, so every rank
performs the same collectives and none can hang. Exact resume: last.ckpt holds the model,
optimiser, scheduler, scaler, step, the loader position and every rank's RNG state; a run killed
anywhere restarts from it and replays the same batches with the same random numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import load_pretrained
from topoflow.errors import CheckpointError, ConfigError, TopoFlowError, TrainingError
from topoflow.lock import exclusive
from topoflow.progress import progress_bar
from train.batch import Batch
from train.checkpoint import (check_data, load_checkpoint, resume_changes, rng_state, save_atomic, seed_everything,
                              set_rng_state)
from train.config import ExperimentConfig
from train.distributed import DistEnv, all_gather, all_reduce_sum, barrier, broadcast_from_main, init_distributed
from train.loader import ShardStream, loader_workers
from train.logs import ScalarLog, scalar_tags, setup_logging
from train.net import build_model, check_shards
from train.optim import build_optimizer, build_scheduler
from train.preempt import Preempted, StopRequest, stop_message
from train.residual import zero_init_output
from train.rundir import LAST, RunRecord, best_checkpoints, check_run_id, start_run, update_best
from train.shards import load_shard_set
from train.step import StepContext, training_loss, validate
from train.threads import use_rank_threads

log = logging.getLogger("train")


@dataclass
class FitResult:
    """What a finished fit leaves behind (the model is the unwrapped module, on its device)."""

    run_dir: Path
    step: int
    best_val_loss: float | None
    best_checkpoint: Path | None
    last_checkpoint: Path
    model: nn.Module


def _trainable_after_freeze(net: nn.Module, fresh: list[str]) -> None:
    """Freeze what init_from supplied whole; train the head and `fresh` (new, dropped or partly loaded
    tensors: `LoadReport.fresh`), so no tensor stays frozen at its random init."""
    keep = set(fresh)
    for name, param in net.named_parameters():
        param.requires_grad = name in keep or name.startswith("head.")
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = [name for name, param in net.named_parameters() if not param.requires_grad]
    log.info("freeze_backbone: %d of %d parameters trainable (head + %s); frozen, as loaded from the checkpoint: %s",
             n_train, sum(p.numel() for p in net.parameters()),
             sorted(k for k in keep if not k.startswith("head.")) or "nothing new", ", ".join(frozen) or "nothing")


def alpha_scalars(net: nn.Module) -> dict[str, float]:
    """Physics alpha per block (and head when per-head) as named floats."""
    out = {}
    for name, value in net.physics_alphas().items():
        flat = value.detach().float().flatten().cpu()
        if flat.numel() == 1:
            out[name] = float(flat[0])
        else:
            out.update({f"{name}/{h}": float(v) for h, v in enumerate(flat)})
    return out


class Trainer:
    """One fit: builds data, model and optimiser, runs the loop, writes logs and checkpoints."""

    def __init__(self, cfg: ExperimentConfig, env: DistEnv, resume: bool, progress: bool) -> None:
        self.cfg, self.env, self.progress = cfg, env, progress
        self.run_dir = Path(cfg.train.run_dir)
        setup_logging(self.run_dir, env.is_main)
        use_rank_threads(cfg.train.threads)
        self.record: RunRecord | None = None  # rank 0's run record (best-k list)
        self.run_id, restore = self._open_run(resume)
        self._data()
        ckpt = self._model(restore)
        tcfg = cfg.train
        self.step, self.epoch, self.best = 0, 0, math.inf
        self.stopping = False  # a stop signal reached some rank: end after this step
        self.shown: dict[str, str] = {}  # the latest losses, on the progress display, named as logged
        self.tags = scalar_tags(tcfg.residual, [])
        self.trainable = [n for n, p in self.net.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.net, tcfg)
        self.scheduler = build_scheduler(self.optimizer, tcfg, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=env.device.type == "cuda" and tcfg.precision == "fp16")
        if ckpt is not None:
            self._restore(ckpt)
        self.model: nn.Module = self.net
        if env.distributed:
            self.model = DistributedDataParallel(self.net, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
        self.alpha_names = list(alpha_scalars(self.net))
        self.log = (ScalarLog(self.run_dir, self.alpha_names, self.step if restore else None,
                               residual=tcfg.residual, targets=self.shards.targets)
                    if env.is_main else None)

    def _open_run(self, resume: bool) -> tuple[str, bool]:
        """Rank 0 claims run_dir (fresh, or resumed from last.ckpt: `train.rundir`); every rank learns the
        outcome, so a refusal stops all ranks instead of leaving the others waiting in a collective."""
        outcome: tuple[str, Any, bool] = ("ok", "", False)
        if self.env.is_main:
            try:
                self.record, restore = start_run(self.run_dir, resume)
                outcome = ("ok", self.record.run_id, restore)
            except TopoFlowError as exc:
                outcome = ("error", str(exc), False)
                broadcast_from_main(outcome)
                raise
        status, run_id, restore = broadcast_from_main(outcome)
        if status == "error":
            raise TrainingError(f"rank 0 refused the run directory: {run_id}")
        return run_id, restore

    def _data(self) -> None:
        """The shard set (checked against the config), its loaders and the step context."""
        cfg, env, tcfg = self.cfg, self.env, self.cfg.train
        self.shards = load_shard_set(cfg.data.shards)
        check_shards(cfg.data, self.shards)

        def stream(split: str, batch_size: int, mode: str) -> ShardStream:
            return ShardStream(cfg.data.shards, split, batch_size, mode=mode, seed=tcfg.seed, rank=env.rank,
                               world_size=env.world_size, shuffle_buffer=tcfg.shuffle_buffer, strict=tcfg.strict_data,
                               num_workers=loader_workers(self.shards, split, env.world_size, tcfg.num_workers))

        self.train_loader = stream("train", tcfg.batch_size, "train")
        self.val_loader = stream("val", tcfg.eval_batch_size, "eval")
        self.steps_per_epoch = len(self.train_loader) // tcfg.accumulate
        if self.steps_per_epoch == 0:
            raise ConfigError(f"an epoch has {len(self.train_loader)} batches per rank, fewer than train.accumulate="
                              f"{tcfg.accumulate}: lower accumulate or batch_size")
        self.total_steps = tcfg.max_steps or tcfg.epochs * self.steps_per_epoch

    def _model(self, restore: bool) -> dict[str, Any] | None:
        """The network (fresh, fine-tuned from init_from, or about to be restored) and the step context;
        returns the checkpoint to restore, if any."""
        cfg, env, tcfg = self.cfg, self.env, self.cfg.train
        torch.manual_seed(tcfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        self.net = build_model(cfg.model, self.shards).to(env.device)
        if tcfg.residual:
            zero_init_output(self.net)
        seed_everything(tcfg.seed + 7919 * (env.rank + 1))  # per-rank streams (dropout / drop-path)
        ckpt = load_checkpoint(self.run_dir / LAST) if restore else None
        if ckpt is not None:
            self._check_resumable(ckpt)
        scale = ckpt.get("residual_scale") if ckpt is not None else None  # a resumed run keeps its numbers
        self.ctx = StepContext.create(self.shards, cfg.model.scan, tcfg.residual, tcfg.precision, env.device, scale)
        if tcfg.init_from is not None and ckpt is None:
            report = load_pretrained(self.net, tcfg.init_from, tcfg.init_variables)  # logs its summary
            if tcfg.freeze_backbone:
                _trainable_after_freeze(self.net, report.fresh(self.net))
        elif tcfg.freeze_backbone and ckpt is not None:
            _trainable_after_freeze(self.net, ckpt["trainable"])
        return ckpt

    def _check_resumable(self, ckpt: dict[str, Any]) -> None:
        path = self.run_dir / LAST
        check_data(ckpt, self.cfg.data, path)
        check_run_id(ckpt, self.run_dir, path)
        changed = resume_changes(ckpt, self.cfg.model_dump(mode="json"), self.env.world_size, path)
        if changed:
            log.warning("resuming with settings changed since %s (they apply from its step on): %s", path,
                        "; ".join(changed))

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.net.load_state_dict(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as exc:  # torch's "parameter group that doesn't match the size of optimizer's group"
            raise CheckpointError(
                f"cannot resume from {self.run_dir / LAST}: it was written with other trainable parameters ({exc}); "
                "this happens across versions that train other tensors (e.g. pos_embed became trainable) or with "
                f"another freeze_backbone. Start a new run: --set train.run_dir=NEW_DIR --set "
                f"train.init_from={self.run_dir / LAST}") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.best = int(ckpt["step"]), int(ckpt["epoch"]), float(ckpt["best_val_loss"])
        self.train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"][self.env.rank])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", self.run_dir / LAST, self.step, self.epoch,
                 self.train_loader.position)

    def _payload(self, val_loss: float | None) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "loader": self.train_loader.state_dict(),
            "rng": all_gather(rng_state()),  # every rank's stream, so a resumed DDP run continues each
            "config": self.cfg.model_dump(mode="json"),
            "store_record": self.shards.record.model_dump(mode="json"),
            "trainable": self.trainable,
            "residual_scale": None if self.ctx.scale is None else self.ctx.scale.cpu(),
            "val_loss": math.nan if val_loss is None else val_loss,
            "best_val_loss": self.best,
        }

    def _checkpoint(self, val_loss: float | None) -> None:
        """Best (if it ranks) before last.ckpt: a kill between them replays this step and rewrites the same best."""
        payload = self._payload(val_loss)  # collective (RNG gather): every rank builds it
        if not self.env.is_main:
            return
        if val_loss is not None:
            saved = update_best(self.run_dir, self.record, payload, val_loss, self.step, self.cfg.train.save_top_k,
                                save_atomic)
            if saved:
                log.info("step %d: val_loss %.4f -> %s", self.step, val_loss, saved.name)
        save_atomic(payload, self.run_dir / LAST)

    def _micro_batches(self) -> Iterator[tuple[int, Batch]]:
        """(epoch, batch) until total_steps, each epoch cut to whole optimiser steps, resuming mid-epoch."""
        per_epoch = self.steps_per_epoch * self.cfg.train.accumulate
        epoch = self.epoch
        while True:
            self.train_loader.set_epoch(epoch)
            self.epoch = epoch
            if self.train_loader.position < per_epoch:
                for batch in self.train_loader:
                    yield epoch, batch
                    if self.train_loader.position >= per_epoch:
                        break
            epoch += 1

    def run(self) -> FitResult:
        """Optimiser steps until total_steps, or until a stop signal: then last.ckpt and `Preempted`."""
        tcfg, env = self.cfg.train, self.env
        log.info("fit: %d optimiser steps (%d per epoch, accumulate %d, %d rank(s) x batch %d), device %s, "
                 "%d parameters", self.total_steps, self.steps_per_epoch, tcfg.accumulate, env.world_size,
                 tcfg.batch_size, env.device, sum(p.numel() for p in self.net.parameters()))
        if self.step >= self.total_steps:
            log.info("run already finished at step %d of %d", self.step, self.total_steps)
        batches, self.clock = self._micro_batches(), (time.perf_counter(), 0)
        stop = StopRequest()
        bar = progress_bar(self.total_steps, initial=self.step, desc="fit", unit="step", log=log,
                           enabled=env.is_main and self.progress)
        with stop.listening(), bar:
            while self.step < self.total_steps and not self.stopping:
                epoch = self._train_step(batches, stop)
                bar.update(1)
                self._after_step(epoch, bar)
        if self.log:
            self.log.close()
        barrier()
        if self.stopping:
            message = stop_message(self.step, stop.signal)
            if env.is_main:
                log.warning(message)
            raise Preempted(message)
        best = best_checkpoints(self.run_dir)
        return FitResult(self.run_dir, self.step, self.best if math.isfinite(self.best) else None,
                         best[0] if best else None, self.run_dir / LAST, self.net)

    def _train_step(self, batches: Iterator[tuple[int, Batch]], stop: StopRequest) -> int:
        """One optimiser step over `accumulate` micro-batches; returns their epoch. The stop flag rides on
        the step's all-reduce, so every rank learns of a signal any rank received after the same step."""
        tcfg, env = self.cfg.train, self.env
        stats = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss sum, micro-batches, non-finite, stop
        bad_keys: list[str] = []
        for micro in range(tcfg.accumulate):
            epoch, batch = next(batches)
            batch = batch.to(env.device, non_blocking=True)
            last = micro == tcfg.accumulate - 1
            no_sync = self.model.no_sync() if env.distributed and not last else contextlib.nullcontext()
            with no_sync:
                loss = training_loss(self.model, batch, self.ctx)
                self.scaler.scale(loss / tcfg.accumulate).backward()
            value = loss.detach().double()
            if not torch.isfinite(value):
                bad_keys.extend(batch.keys)
            stats[:3] += torch.stack([torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0),
                                      torch.ones((), dtype=torch.float64, device=env.device),
                                      (~torch.isfinite(value)).double()])
            self.clock = (self.clock[0], self.clock[1] + batch.x.shape[0])
        stats[3] = float(stop.requested)
        self._optimizer_step(stats, bad_keys)
        self.train_loss, self.stopping = float(stats[0] / stats[1]), bool(stats[3] > 0)
        return epoch

    def _after_step(self, epoch: int, bar: tqdm) -> None:
        """Log, validate and checkpoint as scheduled; a stopping run checkpoints now whatever the schedule."""
        tcfg = self.cfg.train
        if self.step % tcfg.log_every == 0 or self.step == self.total_steps:
            started, seen = self.clock
            self._log_train(epoch, self.train_loss, seen * self.env.world_size / (time.perf_counter() - started))
            self.clock = (time.perf_counter(), 0)
            self.shown[self.tags["train_loss"]] = f"{self.train_loss:.4f}"
            bar.set_postfix(self.shown)
        epoch_end = self.step % self.steps_per_epoch == 0
        if (tcfg.val_every and self.step % tcfg.val_every == 0) or (not tcfg.val_every and epoch_end) \
                or self.step == self.total_steps:
            val = validate(self.net, self.val_loader, self.ctx, tcfg.val_batches)
            val_loss = val.loss
            self.best = min(self.best, val_loss) if math.isfinite(val_loss) else self.best
            self.shown[self.tags["val_loss"]] = f"{val_loss:.4f}"
            bar.set_postfix(self.shown)
            if self.log:
                self.log.write({"step": self.step, "epoch": epoch, "val_loss": val_loss,
                                **{f"val_rmse/{t}": v for t, v in val.rmse.items()}})
            self._checkpoint(val_loss)
            self.clock = (time.perf_counter(), 0)  # samples/s measures training only
        elif self.step % tcfg.checkpoint_every == 0 or self.stopping:
            self._checkpoint(None)

    def _optimizer_step(self, stats: torch.Tensor, bad_keys: list[str]) -> None:
        all_reduce_sum(stats)
        if stats[2] > 0:
            where = f"batch keys {bad_keys}" if bad_keys else "on another rank (its log names the keys)"
            raise TrainingError(
                f"non-finite loss at optimiser step {self.step + 1}: {where}. Check those samples "
                "(`python -m pipeline inspect SHARDS`), lower train.lr or raise train.warmup_steps")
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip or math.inf))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _log_train(self, epoch: int, loss: float, samples_per_s: float) -> None:
        if not self.log:
            return
        row = {"step": self.step, "epoch": epoch, "train_loss": loss, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": self.grad_norm, "samples_per_s": samples_per_s}
        row.update({f"alpha/{k}": v for k, v in alpha_scalars(self.net).items()})
        self.log.write(row)


def fit(cfg: ExperimentConfig, *, resume: bool = False, progress: bool = True, env: DistEnv | None = None) -> FitResult:
    """Train as the config says; with resume=True continue from train.run_dir/last.ckpt if there is one.

    Rank 0 holds run_dir's lock for the whole run: a second fit into the same directory is refused.
    """
    env = env or init_distributed()
    lock = exclusive(Path(cfg.train.run_dir), "run directory") if env.is_main else contextlib.nullcontext()
    with lock:
        return Trainer(cfg, env, resume, progress).run()
