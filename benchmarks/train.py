"""Training throughput, measured side by side in one run (JSON to benchmarks/results/train.json).

1. Loader overhead: the same train step (forward, backward, AdamW) fed by the streaming
   `ShardStream` vs by batches already in memory. Goal: stream >= 0.9x memory.
2. Physics cost: the model with the elevation-barrier bias vs the same model with physics off,
   both from memory. Goal: physics >= 0.75x no-physics.
Repeats are interleaved (A, B, A, B, ...) so a change in machine load hits both sides; ratios are of
medians. Needs a shard set: run `make demo` (or `python -m pipeline shard --config C`) first.

    .venv/bin/python benchmarks/train.py [--config configs/demo.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

# This script is named like the `train` package it measures: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pipeline.config import add_override_argument  # noqa: E402
from train.config import ExperimentConfig, load_experiment_config  # noqa: E402
from train.data import Batch, ShardStream, Static, load_static  # noqa: E402
from train.fit import loader_workers, training_loss  # noqa: E402
from train.loss import latitude_weights  # noqa: E402
from train.net import build_model  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.residual import residual_scale  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


class Stepper:
    """A model + optimiser that runs timed training steps over any batch source."""

    def __init__(self, cfg: ExperimentConfig, static: Static, physics: bool) -> None:
        torch.manual_seed(0)
        model_cfg = cfg.model.model_copy(update={"physics": cfg.model.physics.model_copy(update={"enabled": physics})})
        self.net = build_model(model_cfg, static)
        self.opt = build_optimizer(self.net, cfg.train)
        self.static, self.scan = static, model_cfg.scan
        self.scale = residual_scale(static) if cfg.train.residual else None
        self.lat_w = latitude_weights(static.lat)

    def samples_per_s(self, batches: Iterator[Batch], steps: int) -> float:
        start, count = time.perf_counter(), 0
        for batch in itertools.islice(batches, steps):
            loss = training_loss(self.net, batch, self.static, self.scan, self.scale, self.lat_w)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", type=Path)
    add_override_argument(parser, "train.batch_size=4")
    parser.add_argument("--steps", type=int, default=12, help="train steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cfg = load_experiment_config(args.config, args.overrides)
    static = load_static(cfg.data.shards)
    tcfg = cfg.train
    workers = loader_workers(static, "train", 1, tcfg.num_workers)
    stream = endless(ShardStream(cfg.data.shards, "train", tcfg.batch_size, mode="train", seed=tcfg.seed,
                                 num_workers=workers, shuffle_buffer=tcfg.shuffle_buffer))
    memory_batches = list(itertools.islice(stream, args.steps))
    memory = itertools.cycle(memory_batches)
    physics, plain = Stepper(cfg, static, True), Stepper(cfg, static, False)
    for source in (stream, memory):  # warm-up: worker start, allocator, first-call kernels
        physics.samples_per_s(source, 2)
    plain.samples_per_s(memory, 2)

    runs = interleaved({
        "stream": lambda: physics.samples_per_s(stream, args.steps),
        "memory": lambda: physics.samples_per_s(memory, args.steps),
        "physics_off": lambda: plain.samples_per_s(memory, args.steps),
    }, args.repeats)
    med = {k: statistics.median(v) for k, v in runs.items()}
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
        "goals": {"loader_ratio": 0.9, "physics_ratio": 0.75},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"stream {med['stream']:.2f} vs memory {med['memory']:.2f} samples/s -> loader ratio "
          f"{result['loader_ratio']:.3f} (goal >= 0.9)")
    print(f"physics {med['memory']:.2f} vs physics off {med['physics_off']:.2f} samples/s -> physics ratio "
          f"{result['physics_ratio']:.3f} (goal >= 0.75)")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
