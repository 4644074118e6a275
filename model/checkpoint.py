"""Load this model's, ClimaX Lightning and plain checkpoints into a TopoFlowClimaX, by name.

Variable embeddings (`token_embeds.{i}`, `var_embed` rows) are matched by variable NAME: the
checkpoint's list comes from its top-level `variables` entry (or the `variables=` argument), else the
checkpoint's order is assumed to be the model's. `pos_embed` is interpolated to the model's patch
grid; any other shape mismatch is dropped (left at init) and reported. Physics parameters are not in
ClimaX checkpoints, so they stay at their init and show up as missing.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from model.net import TopoFlowClimaX
from topoflow.errors import CheckpointError

log = logging.getLogger(__name__)
PREFIXES = ("net.", "module.", "_orig_mod.")  # Lightning, DDP, torch.compile
TOKEN_KEY = re.compile(r"^token_embeds\.(\d+)\.(.+)$")


@dataclass
class LoadReport:
    """What `load_pretrained` did. Keys are the model's state-dict names."""

    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks (left at init)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no use for
    reshaped: dict[str, str] = field(default_factory=dict)  # key -> how it was resized (pos_embed interpolation)
    remapped: dict[str, str] = field(default_factory=dict)  # variable -> "ckpt index j -> model index i"
    dropped: dict[str, str] = field(default_factory=dict)  # key -> "ckpt shape vs model shape" (left at init)

    def summary(self) -> str:
        lines = [f"loaded checkpoint: {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.reshaped)} reshaped, {len(self.remapped)} variables remapped, {len(self.dropped)} dropped"]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"  {name}: {', '.join(items)}")
        for name, items in (("reshaped", self.reshaped), ("remapped", self.remapped), ("dropped", self.dropped)):
            lines += [f"  {name} {k}: {v}" for k, v in items.items()]
        return "\n".join(lines)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (init_from / --checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated zips, bad pickles, foreign files
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "The file is corrupt, truncated or not a torch checkpoint (or holds objects other than tensors); "
            "re-copy or re-save it"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _state_dict(obj: Mapping, source: str) -> dict[str, Tensor]:
    """Unwrap Lightning (`state_dict`) / trainer (`model`) checkpoints and strip wrapper prefixes."""
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    out = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            if key == "variables":
                continue
            raise CheckpointError(f"checkpoint {source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _remap_variables(sd: dict[str, Tensor], model_sd: dict[str, Tensor], in_vars: list[str], ckpt_vars: list[str] | None, report: LoadReport) -> None:
    """Move token_embeds.{j}.* and var_embed[:, j] of checkpoint variable j to the model's index."""
    tokens: dict[int, dict[str, Tensor]] = {}
    for key in [k for k in sd if TOKEN_KEY.match(k)]:
        j, rest = TOKEN_KEY.match(key).groups()
        tokens.setdefault(int(j), {})[rest] = sd.pop(key)
    n_ckpt = len(tokens) if ckpt_vars is None else len(ckpt_vars)
    names = ckpt_vars if ckpt_vars is not None else in_vars[:n_ckpt]
    var_embed = sd.pop("var_embed", None)
    new_embed = model_sd["var_embed"].clone()
    if var_embed is not None and var_embed.shape[2] != new_embed.shape[2]:
        sd["var_embed"], var_embed = var_embed, None  # other embed dim: reported as dropped by the caller
    for i, name in enumerate(in_vars):
        if name not in names:
            report.missing += [f"token_embeds.{i}.{rest}" for rest in ("proj.weight", "proj.bias")] + [f"var_embed[{name}]"]
            continue
        j = names.index(name)
        for rest, value in tokens.pop(j, {}).items():
            sd[f"token_embeds.{i}.{rest}"] = value
        if var_embed is not None and j < var_embed.shape[1]:
            new_embed[:, i] = var_embed[:, j]
        if i != j or ckpt_vars is not None:
            report.remapped[name] = f"ckpt index {j} -> model index {i}"
    report.unexpected += [f"token_embeds.{j}.{rest} ({names[j] if j < len(names) else '?'})" for j, t in tokens.items() for rest in t]
    if var_embed is not None:
        sd["var_embed"] = new_embed


def _interpolate_pos_embed(value: Tensor, target: Tensor, grid: tuple[int, int]) -> Tensor | None:
    """Bicubic resize of a (1, h*w, D) grid embedding to (1, gh*gw, D), assuming the model's aspect ratio."""
    n_old, dim = value.shape[1], value.shape[2]
    gh, gw = grid
    h = round(math.sqrt(n_old * gh / gw))
    if h == 0 or n_old % h or dim != target.shape[2]:
        return None
    w = n_old // h
    img = value.reshape(1, h, w, dim).permute(0, 3, 1, 2).float()
    out = F.interpolate(img, size=(gh, gw), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(target.dtype)


def load_pretrained(net: TopoFlowClimaX, source: str | Path | Mapping, variables: Sequence[str] | None = None) -> LoadReport:
    """Load weights by name into `net` (strict=False) and return + log what was missing/remapped/resized."""
    name = str(source) if not isinstance(source, Mapping) else "<state dict>"
    obj = _read(Path(source)) if not isinstance(source, Mapping) else dict(source)
    ckpt_vars = list(variables) if variables is not None else obj.get("variables")
    sd = _state_dict(obj, name)
    model_sd = net.state_dict()
    report = LoadReport()
    _remap_variables(sd, model_sd, net.in_vars, list(ckpt_vars) if ckpt_vars is not None else None, report)
    usable = {}
    for key, value in sd.items():
        if key not in model_sd:
            report.unexpected.append(key)
        elif value.shape == model_sd[key].shape:
            usable[key] = value
        elif key == "pos_embed" and (resized := _interpolate_pos_embed(value, model_sd[key], net.grid)) is not None:
            usable[key] = resized
            report.reshaped[key] = f"{tuple(value.shape)} -> {tuple(resized.shape)} (bicubic interpolation to the {net.grid} patch grid)"
        else:
            report.dropped[key] = f"checkpoint {tuple(value.shape)} vs model {tuple(model_sd[key].shape)}"
    result = net.load_state_dict(usable, strict=False)
    report.missing = sorted(set(report.missing + result.missing_keys) - set(report.dropped))
    log.info("%s: %s", name, report.summary())
    return report
