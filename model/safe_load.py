"""Read checkpoint files with `torch.load(weights_only=True)` and an explicit allow-list, never unpickling code.

Lightning checkpoints hold more than tensors: `hyper_parameters` is a dict, an `argparse.Namespace` or
Lightning's `AttributeDict`, with lists, strings and `pathlib` paths inside. Those classes are allowed by
name (`SAFE_GLOBALS`). Lightning need not be installed: its `AttributeDict` (a dict subclass) is matched by
a stand-in registered under the module paths Lightning pickles it from, which reads it as a plain dict.
Any other class is refused, and the error names it and says how to re-save the file as plain data.
"""

from __future__ import annotations

import argparse
import pathlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from topoflow.errors import CheckpointError

# Where Lightning defines AttributeDict: lightning.fabric.utilities.data (lightning >= 2.0; also the standalone
# lightning_fabric package) and pytorch_lightning.utilities.parsing (pytorch-lightning 1.x, ClimaX's era).
LIGHTNING_ATTRIBUTE_DICTS = (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)
_UNSUPPORTED = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _as_plain_dict(path: str) -> type:
    """A global the weights-only unpickler knows as `path` (torch names it module.name) whose instances
    unpickle as plain dicts: torch sets items only on exact dicts, and Lightning's AttributeDict is a dict
    subclass with no state of its own (its attributes are its items)."""
    module, name = path.rsplit(".", 1)
    return type(name, (), {"__module__": module, "__new__": lambda cls, *args: {},
                           "__doc__": f"Reads {path} as a dict."})


SAFE_GLOBALS: list[type] = [
    argparse.Namespace,
    pathlib.PurePosixPath, pathlib.PosixPath, pathlib.PureWindowsPath, pathlib.WindowsPath,
    *(_as_plain_dict(path) for path in LIGHTNING_ATTRIBUTE_DICTS),
]


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """A refused class gets its own fix; anything else reads as a damaged or foreign file."""
    refused = _UNSUPPORTED.search(str(exc))
    if refused:
        return CheckpointError(
            f"checkpoint {path} holds a pickled {refused[1]}, which is not on the allow-list of classes a checkpoint "
            "may hold (model.safe_load.SAFE_GLOBALS); it is not unpickled, since that could run code. In an "
            "environment that trusts the file, re-save its weights as plain data: "
            "ckpt = torch.load(path, weights_only=False); torch.save({'state_dict': ckpt['state_dict'], "
            "'variables': [its variable names]}, 'plain.ckpt')")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(
        f"cannot read checkpoint {path}: {type(exc).__name__}: {first}. The file is corrupt, truncated or not a "
        "torch checkpoint; re-copy or re-save it")


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at `path` as a dict, loaded with weights_only=True and SAFE_GLOBALS."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (init_from / --checkpoint)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated zips, bad pickles, refused classes
        raise _unreadable(path, exc) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)
