"""Training throughput, measured side by side in one run (JSON to benchmarks/results/train.json).

1. Loader overhead: the same train step (forward, backward, AdamW) fed by the streaming
   `ShardStream` vs by batches already in memory. Goal: stream >= 0.9x memory.
2. Physics cost: the model with the elevation-barrier bias vs the same model with physics off,
   both from memory. Goal: physics >= 0.75x no-physics.
3. Threads with 2 ranks: `torchrun --nproc_per_node=2 -m train fit` with each rank's torch threads
   sized to its share of the cores (`train.threads` unset: cores owned / ranks, train/threads.py)
   vs torch's own default outside torchrun (every process takes all cores: 2 ranks x 2 threads on 2
   cores). Measured as the median samples/s of the metrics.csv rows (startup and validation excluded).
Repeats are interleaved (A, B, A, B, ...) so a change in machine load hits both sides; ratios are of
medians. Needs a shard set: run `make demo` (or `python -m pipeline shard --config C`) first.

    .venv/bin/python -m benchmarks.train [--config configs/demo.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import os
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from benchmarks import save_result
from topoflow.config import add_override_argument
from train.batch import Batch
from train.config import ExperimentConfig, load_experiment_config
from train.loader import ShardStream, loader_workers
from train.net import build_model
from train.optim import build_optimizer
from train.shards import ShardSet, load_shard_set
from train.step import StepContext, training_loss


class Stepper:
    """A model + optimiser that runs timed training steps over any batch source."""

    def __init__(self, cfg: ExperimentConfig, shards: ShardSet, physics: bool) -> None:
        torch.manual_seed(0)
        model_cfg = cfg.model.model_copy(update={"physics": cfg.model.physics.model_copy(update={"enabled": physics})})
        self.net = build_model(model_cfg, shards)
        self.opt = build_optimizer(self.net, cfg.train)
        self.ctx = StepContext.create(shards, model_cfg.scan, cfg.train.residual, "fp32", torch.device("cpu"))

    def samples_per_s(self, batches: Iterator[Batch], steps: int) -> float:
        start, count = time.perf_counter(), 0
        for batch in itertools.islice(batches, steps):
            loss = training_loss(self.net, batch, self.ctx)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            count += batch.x.shape[0]
        return count / (time.perf_counter() - start)


def endless(loader: ShardStream) -> Iterator[Batch]:
    """The streaming loader across epochs, as training sees it."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            out[name].append(measure())
    return out


def two_rank_fit(config: Path, overrides: list[str], threads: int | None, steps: int) -> float:
    """Median samples/s (both ranks) of a 2-rank torchrun fit of `steps` steps; threads None = train/threads.py's plan."""
    with tempfile.TemporaryDirectory() as run_dir:
        sets = [*overrides, f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"train.val_every={10 * steps}",
                "train.log_every=5", f"train.threads={'null' if threads is None else threads}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "fit",
               "--config", str(config), "--no-progress", *(a for kv in sets for a in ("--set", kv))]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        with open(Path(run_dir) / "metrics.csv") as fh:
            rates = [float(r["train_samples_per_s"]) for r in csv.DictReader(fh) if r.get("train_samples_per_s")]
    return 2 * statistics.median(rates[1:])  # the first row holds worker start-up; per-rank rate x 2 ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", type=Path)
    add_override_argument(parser, "train.batch_size=4")
    parser.add_argument("--steps", type=int, default=12, help="train steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank-steps", type=int, default=40, help="steps of each 2-rank torchrun fit")
    parser.add_argument("--rank-repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_experiment_config(args.config, args.overrides)
    shards = load_shard_set(cfg.data.shards)
    tcfg = cfg.train
    workers = loader_workers(shards, "train", 1, tcfg.num_workers)
    stream = endless(ShardStream(cfg.data.shards, "train", tcfg.batch_size, mode="train", seed=tcfg.seed,
                                 num_workers=workers, shuffle_buffer=tcfg.shuffle_buffer))
    memory_batches = list(itertools.islice(stream, args.steps))
    memory = itertools.cycle(memory_batches)
    physics, plain = Stepper(cfg, shards, True), Stepper(cfg, shards, False)
    for source in (stream, memory):  # warm-up: worker start, allocator, first-call kernels
        physics.samples_per_s(source, 2)
    plain.samples_per_s(memory, 2)

    runs = interleaved({
        "stream": lambda: physics.samples_per_s(stream, args.steps),
        "memory": lambda: physics.samples_per_s(memory, args.steps),
        "physics_off": lambda: plain.samples_per_s(memory, args.steps),
    }, args.repeats)
    ranks = interleaved({
        "sized": lambda: two_rank_fit(args.config, args.overrides, None, args.rank_steps),
        "all_cores_each": lambda: two_rank_fit(args.config, args.overrides, torch.get_num_threads(), args.rank_steps),
    }, args.rank_repeats)
    med = {k: statistics.median(v) for k, v in {**runs, **{f"two_ranks_{k}": v for k, v in ranks.items()}}.items()}
    result = {
        "config": str(args.config),
        "overrides": args.overrides,
        "batch_size": tcfg.batch_size,
        "num_workers": workers,
        "steps_per_repeat": args.steps,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "samples_per_s": runs,
        "median_samples_per_s": med,
        "loader_ratio": med["stream"] / med["memory"],
        "physics_ratio": med["memory"] / med["physics_off"],
        "two_ranks": {"cores": len(os.sched_getaffinity(0)), "steps": args.rank_steps, "samples_per_s": ranks,
                      "threads_all_cores_each": torch.get_num_threads()},
        "two_ranks_sized_over_all_cores": med["two_ranks_sized"] / med["two_ranks_all_cores_each"],
        "goals": {"loader_ratio": 0.9, "physics_ratio": 0.75},
    }
    save_result("train", result)
    print(f"stream {med['stream']:.2f} vs memory {med['memory']:.2f} samples/s -> loader ratio "
          f"{result['loader_ratio']:.3f} (goal >= 0.9)")
    print(f"physics {med['memory']:.2f} vs physics off {med['physics_off']:.2f} samples/s -> physics ratio "
          f"{result['physics_ratio']:.3f} (goal >= 0.75)")
    print(f"2 ranks: threads sized to cores {med['two_ranks_sized']:.2f} vs {torch.get_num_threads()} threads each "
          f"{med['two_ranks_all_cores_each']:.2f} samples/s -> {result['two_ranks_sized_over_all_cores']:.2f}x")


if __name__ == "__main__":
    main()
