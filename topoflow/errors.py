"""One error hierarchy for every expected failure (DESIGN.md "Errors").

The command lines catch only `TopoFlowError` and print its message, which names what failed, where,
and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TopoFlowError(Exception):
    """An expected failure: bad input, missing or damaged files, mismatched configs."""


class ConfigError(TopoFlowError):
    """A configuration file or override that cannot be used; the message names the key and the fix."""


class SourceError(TopoFlowError):
    """A raw source that cannot be used; the message names the file or variable and the fix."""


class StoreError(TopoFlowError):
    """A feature store that is missing, unfinished, foreign, of another schema or built from other inputs."""


class ShardSetError(TopoFlowError):
    """A shard set that cannot be used as it is; the message names the file and the fix."""


class CheckpointError(TopoFlowError):
    """A checkpoint that cannot be read or used for what was asked; the message names the file and the fix."""


class TrainingError(TopoFlowError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the batch."""


class OutputError(TopoFlowError):
    """An output that cannot be written (full disk, read-only file system, no permission, or another
    run holding it); the message names the path, the cause and the fix."""
