"""Load this model's, ClimaX Lightning and plain checkpoints into a TopoFlowClimaX, by name.

Keys: wrapper prefixes are stripped (`net.` Lightning, `module.` DDP, `_orig_mod.` torch.compile), and
ClimaX's older names are renamed as ClimaX's own loaders do: every `channel` in a key becomes `var`
(`channel_embed` -> `var_embed`, `channel_query`, `channel_agg.*`; `load_pretrained_weights` in
microsoft/ClimaX src/climax/global_forecast/module.py, regional_forecast/module.py and
climate_projection/module.py). A parallel patch embedding (`token_embeds.proj_weights` (V, D, 1, p, p),
`token_embeds.proj_biases` (V, D); src/climax/parallelpatchembed.py) is split per variable.

Variable embeddings (`token_embeds.{j}`, `var_embed[:, j]`) are matched by variable NAME (model.variables):
a checkpoint without names is refused unless told how to match. `pos_embed` is interpolated to the
model's patch grid; any other shape mismatch is dropped (left at init) and reported. `LoadReport.loaded`
lists the tensors that came whole from the checkpoint: freeze_backbone freezes only those.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from model.net import TopoFlowClimaX
from model.safe_load import read_checkpoint
from model.variables import CheckpointNames, checkpoint_names, match_variables, unnamed_error
from topoflow.errors import CheckpointError

log = logging.getLogger(__name__)
PREFIXES = ("net.", "module.", "_orig_mod.")
TOKEN_KEY = re.compile(r"^token_embeds\.(\d+)\.(.+)$")
PARALLEL_KEYS = {"token_embeds.proj_weights": "proj.weight", "token_embeds.proj_biases": "proj.bias"}


@dataclass
class LoadReport:
    """What `load_pretrained` did. Keys are the model's state-dict names."""

    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks (left at init)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no use for
    reshaped: dict[str, str] = field(default_factory=dict)  # key -> how it was resized (pos_embed interpolation)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> "ckpt shape vs model shape" (left at init)
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model key (ClimaX names)
    variables: dict[str, str] = field(default_factory=dict)  # model variable -> its checkpoint variable, or init
    variable_source: str = "none"  # where the checkpoint's variable names came from
    partial: dict[str, str] = field(default_factory=dict)  # key -> the part left at init (var_embed rows)
    loaded: list[str] = field(default_factory=list)  # model keys whose whole value came from the checkpoint

    def fresh(self, net: nn.Module) -> list[str]:
        """Parameters that did not come whole from the checkpoint: what freeze_backbone leaves trainable."""
        loaded = set(self.loaded)
        return [name for name, _ in net.named_parameters() if name not in loaded]

    def summary(self) -> str:
        lines = [f"loaded checkpoint: {len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.reshaped)} reshaped, {len(self.dropped)} dropped, "
                 f"{len(self.renamed)} renamed; variables by name from {self.variable_source}"]
        lines += [f"  variable {k}: {v}" for k, v in self.variables.items()]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"  {name}: {', '.join(items)}")
        for name, table in (("reshaped", self.reshaped), ("dropped", self.dropped), ("partial", self.partial),
                            ("renamed", self.renamed)):
            lines += [f"  {name} {k}: {v}" for k, v in table.items()]
        return "\n".join(lines)


def _strip(key: str) -> str:
    """Drop the wrappers' prefixes: Lightning's `net.`, DDP's `module.`, torch.compile's `_orig_mod.`."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _state_dict(obj: Mapping, source: str, report: LoadReport) -> dict[str, Tensor]:
    """Unwrap Lightning (`state_dict`) / trainer (`model`) checkpoints; model key names, parallel embeds split."""
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
        stripped = _strip(key)
        name = stripped.replace("channel", "var")  # ClimaX's rename
        if name in PARALLEL_KEYS:
            out.update({f"token_embeds.{j}.{PARALLEL_KEYS[name]}": v for j, v in enumerate(value)})
            name = f"token_embeds.{{0..{len(value) - 1}}}.{PARALLEL_KEYS[name]}"
        else:
            out[name] = value
        if name != stripped:
            report.renamed[key] = name
    return out


def _pop_tokens(sd: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """Remove token_embeds.{j}.* from sd, grouped by checkpoint variable index j."""
    tokens: dict[int, dict[str, Tensor]] = {}
    for key in [k for k in sd if TOKEN_KEY.match(k)]:
        j, rest = TOKEN_KEY.match(key).groups()
        tokens.setdefault(int(j), {})[rest] = sd.pop(key)
    return tokens


def _match(names: CheckpointNames, n_ckpt: int, in_vars: list[str], source: str) -> dict[int, int]:
    """model index -> checkpoint index, by name (or by position when told so); a count mismatch is an error."""
    if names.names is None:
        return {i: i for i in range(min(n_ckpt, len(in_vars)))}
    if len(names.names) != n_ckpt:
        raise CheckpointError(
            f"checkpoint {source} has {n_ckpt} variable embeddings but its variable names ({names.source}) list "
            f"{len(names.names)}: {names.names}. Give exactly one name per embedding, in the checkpoint's order")
    return match_variables(names.names, in_vars)


def _n_variables(sd: Mapping[str, Tensor]) -> int:
    """How many variables the checkpoint embeds: token_embeds indices and var_embed columns."""
    indices = [int(m[1]) for k in sd if (m := TOKEN_KEY.match(k))]
    columns = sd["var_embed"].shape[1] if "var_embed" in sd and sd["var_embed"].dim() == 3 else 0
    return max(max(indices, default=-1) + 1, columns)


def _remap_variables(sd: dict[str, Tensor], net: TopoFlowClimaX, names: CheckpointNames, source: str,
                     report: LoadReport) -> None:
    """Move token_embeds.{j}.* and var_embed[:, j] of checkpoint variable j to the index of its model variable."""
    n_ckpt = _n_variables(sd)
    match = _match(names, n_ckpt, net.in_vars, source)
    tokens, var_embed = _pop_tokens(sd), sd.pop("var_embed", None)
    new_embed = net.var_embed.detach().clone()
    same_dim = var_embed is not None and var_embed.shape[2] == new_embed.shape[2]

    def label(j: int) -> str:
        return f"{names.names[j]!r} (checkpoint index {j})" if names.names else f"checkpoint index {j}"

    for i, var in enumerate(net.in_vars):
        if i not in match:
            report.variables[var] = "left at init (the checkpoint has no such variable)"
            continue
        j = match[i]
        sd.update({f"token_embeds.{i}.{rest}": value for rest, value in tokens.get(j, {}).items()})
        if same_dim:
            new_embed[:, i] = var_embed[:, j]
        report.variables[var] = f"<- {label(j)}"
    used = set(match.values())
    report.unexpected += [f"token_embeds.{j}.{rest} ({label(j)})" for j, t in tokens.items() if j not in used for rest in t]
    if var_embed is not None:
        sd["var_embed"] = new_embed if same_dim else var_embed  # another embed dim: reported as dropped
        unmatched = [var for i, var in enumerate(net.in_vars) if i not in match]
        if same_dim and unmatched:
            report.partial["var_embed"] = f"rows of {unmatched} left at init"


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


def _usable(sd: dict[str, Tensor], net: TopoFlowClimaX, report: LoadReport) -> dict[str, Tensor]:
    """The entries the model can take as they are (pos_embed resized); the rest reported unexpected/dropped."""
    model_sd = net.state_dict()
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
    return usable


def load_pretrained(net: TopoFlowClimaX, source: str | Path | Mapping,
                    variables: Sequence[str] | str | None = None) -> LoadReport:
    """Load weights by name into `net` (strict=False) and return + log what was loaded, missing, remapped, resized.

    `variables` (train.init_variables) names the checkpoint's variables in its order when the checkpoint does
    not name them itself: a list of names, `climax` (ClimaX's default_vars) or `positional`.
    """
    name = str(source) if not isinstance(source, Mapping) else "<state dict>"
    obj = read_checkpoint(Path(source)) if not isinstance(source, Mapping) else dict(source)
    report = LoadReport()
    sd = _state_dict(obj, name, report)
    if n_ckpt := _n_variables(sd):
        names = checkpoint_names(obj, variables, name)
        if names is None:
            raise unnamed_error(name, n_ckpt, net.in_vars)
        report.variable_source = names.source
        _remap_variables(sd, net, names, name, report)
    usable = _usable(sd, net, report)
    result = net.load_state_dict(usable, strict=False)
    report.loaded = sorted(set(usable) - set(report.partial))
    report.missing = sorted(set(result.missing_keys) - set(report.dropped))
    log.info("%s: %s", name, report.summary())
    return report
