"""`python -m train {fit,evaluate,ablate} --config C [--set key=value ...]` (also under torchrun)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from topoflow.config import add_override_argument
from topoflow.errors import TopoFlowError
from train.config import load_experiment_config
from train.distributed import init_distributed, shutdown
from train.preempt import EXIT_PREEMPTED, Preempted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "fit": "train (DDP under torchrun), writing checkpoints and logs to train.run_dir",
        "evaluate": "skill on the test split vs persistence: metrics.json, report.md, figures",
        "ablate": "train every ablate.variants x ablate.seeds, evaluate each on the test split, tabulate and test "
                  "each variant against the control",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, type=Path, help="experiment YAML")
        add_override_argument(p, "train.lr=5e-5")
        p.add_argument("--no-progress", action="store_true", help="no progress bars (batch jobs)")
    sub.choices["fit"].add_argument("--resume", action="store_true", help="continue from train.run_dir/last.ckpt")
    sub.choices["evaluate"].add_argument("--checkpoint", type=Path, help="default: the best in train.run_dir")
    sub.choices["evaluate"].add_argument("--output", type=Path, help="report folder (default <run_dir>/report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        env = init_distributed()
        try:
            progress = not args.no_progress
            if args.command == "ablate":
                from train.ablate import ablate

                out = ablate(args.config, args.overrides, progress=progress, env=env)
                if env.is_main:
                    print(f"ablation table: {out}")
                return 0
            cfg = load_experiment_config(args.config, args.overrides)
            if args.command == "fit":
                from train.fit import fit

                result = fit(cfg, resume=args.resume, progress=progress, env=env)
                if env.is_main:
                    best = f"{result.best_checkpoint} (val loss {result.best_val_loss:.4f})" if result.best_checkpoint else "none"
                    print(f"trained {result.step} steps; best checkpoint: {best}; last: {result.last_checkpoint}")
                return 0
            from train.evaluate import evaluate

            report = evaluate(cfg, checkpoint=args.checkpoint, output=args.output, progress=progress, env=env)
            if env.is_main:
                print(f"report: {report} (metrics.json and figures beside it)")
            return 0
        finally:
            shutdown()
    except Preempted:  # rank 0 has logged where it stopped and how to go on
        return EXIT_PREEMPTED
    except TopoFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
