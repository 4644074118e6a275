"""`python -m model estimate --preset reference [--batch-size 4] [--bf16]`: memory plan per attention backend."""

from __future__ import annotations

import argparse
import sys

from model.presets import PRESETS, estimate_memory


def _gib(x: float) -> str:
    return f"{x / 2**30:8.3f} GiB" if x >= 2**30 else f"{x / 2**20:8.3f} MiB"


def estimate(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    bytes_per_value = 2 if args.bf16 else 4
    print(f"preset {args.preset}: grid {preset.layout.grid}, patch {preset.layout.patch_size}, "
          f"embed {preset.cfg.embed_dim}, depth {preset.cfg.depth}, heads {preset.cfg.num_heads}, "
          f"batch {args.batch_size}, activations {'bf16' if args.bf16 else 'fp32'}")
    for backend in ("naive", "sdpa", "flex"):
        est = estimate_memory(args.preset, args.batch_size, backend, bytes_per_value)
        if backend == "naive":
            print(f"  params {est['params'] / 1e6:.2f} M ({est['trainable_params'] / 1e6:.2f} M trainable), tokens {int(est['tokens'])}")
            print(f"  weights {_gib(est['weights_bytes'])}  grads+AdamW {_gib(est['optimizer_bytes'])}  activations {_gib(est['activation_bytes'])}")
        print(f"  attention-bias extra per physics block [{backend:5s}] {_gib(est['attention_bias_bytes'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="parameters and memory of a preset per attention backend")
    est.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    est.add_argument("--batch-size", type=int, default=1)
    est.add_argument("--bf16", action="store_true", help="count activations in bf16")
    args = parser.parse_args(argv)
    return estimate(args)


if __name__ == "__main__":
    sys.exit(main())
