"""`python -m pipeline {sample,build,shard,inspect,requests}`: the data-side command line.

Each subcommand lives in its own module with a `add_arguments(parser)` and a `run(args) -> int`;
this file only wires them up, so importing one stage never pulls in another's dependencies. Only
expected failures (`TopoFlowError`) become a one-line error; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from topoflow.errors import TopoFlowError

SUBCOMMANDS = {
    "sample": ("pipeline.sample.write", "write the embedded real-terrain raw source (NetCDF)"),
    "build": ("pipeline.build", "raw source -> features.zarr (Dask, resumable)"),
    "shard": ("pipeline.shard", "features.zarr -> WebDataset tar shards + manifest.json"),
    "inspect": ("pipeline.inspect", "validate a feature store or a shard set and print a summary"),
    "requests": ("pipeline.requests", "print the cdsapi requests that download each source (nothing is fetched)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except TopoFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
