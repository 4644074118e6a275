"""`python -m pipeline {sample,build,shard,inspect,requests}`: the data-side command line.

Each subcommand lives in its own module with a `add_arguments(parser)` and a `run(args) -> int`;
this file only wires them up, so importing one stage never pulls in another's dependencies. Only
expected failures (`TopoFlowError`) become a one-line error; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator

from topoflow.errors import TopoFlowError
from topoflow.progress import LOG_FORMAT

LOGGERS = ("pipeline", "topoflow")  # this project's records; third-party INFO chatter stays off

SUBCOMMANDS = {
    "sample": ("pipeline.sample.write", "write the embedded real-terrain raw source (NetCDF)"),
    "build": ("pipeline.build", "raw source -> features.zarr (Dask, resumable)"),
    "shard": ("pipeline.shard", "features.zarr -> WebDataset tar shards + manifest.json"),
    "inspect": ("pipeline.inspect", "validate a feature store or a shard set and print a summary"),
    "requests": ("pipeline.requests", "print the cdsapi requests that download each source (nothing is fetched)"),
}


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """INFO records (progress lines included) to stderr with timestamps, for one command only: main() also
    runs in-process (tests), where a handler left behind would write to a stream that has since closed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        with console_logging():
            return int(module.run(args) or 0)
    except TopoFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
