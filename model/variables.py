"""Which model variable a checkpoint's variable feeds: names, aliases, and where a checkpoint keeps them.

Variables are matched BY NAME, never silently by position: a checkpoint trained on ClimaX's or the
ERA5/CAMS download names (`10m_u_component_of_wind`, `2m_temperature`, `orography`, ...) feeds our
`u`, `temp`, `elevation`, ... through `ALIASES`. A checkpoint that does not name its variables needs
`train.init_variables` (its names, in its order) or `train.init_variables: positional`.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from topoflow.errors import CheckpointError

POSITIONAL = "positional"  # train.init_variables: checkpoint variable j feeds model variable j
CLIMAX = "climax"  # train.init_variables: ClimaX's default_vars, in their order

# ClimaX's `default_vars`, in order (microsoft/ClimaX configs/pretrain_climax.yaml and
# configs/global_forecast_climax.yaml, model.net.init_args.default_vars; "lattitude" is ClimaX's spelling).
# ClimaX's fine-tuning loaders match the released checkpoints' token embeddings to this list by position.
_LEVELS = (50, 250, 500, 600, 700, 850, 925)
CLIMAX_DEFAULT_VARS: tuple[str, ...] = (
    "land_sea_mask", "orography", "lattitude", "2m_temperature", "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    *(f"{field}_{level}" for field in ("geopotential", "u_component_of_wind", "v_component_of_wind", "temperature",
                                       "relative_humidity", "specific_humidity") for level in _LEVELS),
)

# Outside names -> ours (configs/*.yaml data.variables and source recipes). Pressure-level fields have no
# counterpart in this surface model, so they stay known but unmatched.
ALIASES: dict[str, str] = {
    # ClimaX / WeatherBench (see CLIMAX_DEFAULT_VARS)
    "10m_u_component_of_wind": "u", "10m_v_component_of_wind": "v", "2m_temperature": "temp",
    "orography": "elevation", "land_sea_mask": "land_sea", "lattitude": "lat2d", "latitude": "lat2d",
    "longitude": "lon2d",
    # ERA5 single levels and CAMS EAC4 download names and file variables (configs/era5_cams_china.yaml)
    "u10": "u", "v10": "v", "t2m": "temp", "2m_dewpoint_temperature": "dewpoint", "d2m": "dewpoint",
    "surface_pressure": "psfc", "sp": "psfc", "lsm": "land_sea", "particulate_matter_2.5um": "pm25",
    "pm2p5": "pm25", "particulate_matter_10um": "pm10", "sulphur_dioxide": "so2", "nitrogen_dioxide": "no2",
    "carbon_monoxide": "co", "ozone": "o3", "go3": "o3", "population_density": "population",
}
KNOWN_NAMES = frozenset(ALIASES) | frozenset(CLIMAX_DEFAULT_VARS)


@dataclass(frozen=True)
class CheckpointNames:
    """A checkpoint's variable names in its order (None: positional) and where they came from."""

    names: list[str] | None
    source: str


def unknown_names(names: Sequence[str], model_vars: Sequence[str]) -> list[str]:
    """Names that are neither a model variable nor a known outside name (typos), with a close match each."""
    known = sorted(set(model_vars) | KNOWN_NAMES)
    out = []
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            out.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    return out


def match_variables(ckpt_names: Sequence[str], model_vars: Sequence[str]) -> dict[int, int]:
    """model index -> checkpoint index. An exact name wins over an alias; of several aliases, the first."""
    exact = {name: j for j, name in enumerate(ckpt_names)}
    out = {}
    for i, var in enumerate(model_vars):
        if var in exact:
            out[i] = exact[var]
        elif aliased := [j for j, name in enumerate(ckpt_names) if ALIASES.get(name) == var]:
            out[i] = aliased[0]
    return out


def _as_mapping(node: Any) -> Mapping | None:
    """Lightning writes hyper_parameters as a dict, an AttributeDict (a dict) or an argparse.Namespace."""
    return vars(node) if isinstance(node, argparse.Namespace) else node if isinstance(node, Mapping) else None


def _names(value: Any) -> list[str] | None:
    ok = isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
    return list(value) if ok else None


def _default_vars(node: Any, depth: int = 0) -> list[str] | None:
    """ClimaX's `default_vars` anywhere in hyper_parameters (top level, or nested as LightningCLI's
    `net: {init_args: {default_vars: ...}}`)."""
    node = _as_mapping(node)
    if node is None or depth > 3:
        return None
    if (found := _names(node.get("default_vars"))) is not None:
        return found
    return next((f for v in node.values() if (f := _default_vars(v, depth + 1)) is not None), None)


def names_in_checkpoint(obj: Mapping) -> CheckpointNames | None:
    """The names a checkpoint carries, looked up in this order: our own config (`train fit` checkpoints), a
    top-level `variables` list, Lightning's hyper_parameters; None when it names none."""
    config = obj.get("config")
    data = config.get("data") if isinstance(config, Mapping) else None
    specs = data.get("variables") if isinstance(data, Mapping) else None
    if isinstance(specs, list) and specs and all(isinstance(s, Mapping) and "name" in s for s in specs):
        return CheckpointNames([str(s["name"]) for s in specs], "config.data.variables")
    if (names := _names(obj.get("variables"))) is not None:
        return CheckpointNames(names, "variables")
    if (names := _default_vars(obj.get("hyper_parameters"))) is not None:
        return CheckpointNames(names, "hyper_parameters default_vars")
    return None


def checkpoint_names(obj: Mapping, given: Sequence[str] | str | None, path: str) -> CheckpointNames | None:
    """The checkpoint's own names if it has any, else `given` (train.init_variables: names in the
    checkpoint's order, `climax` for ClimaX's default_vars, or `positional`); None when neither names them."""
    if isinstance(given, str) and given not in (POSITIONAL, CLIMAX):
        raise ValueError(f"variables={given!r}: pass a list of names, {POSITIONAL!r} or {CLIMAX!r}")
    wanted = list(CLIMAX_DEFAULT_VARS) if given == CLIMAX else given
    own = names_in_checkpoint(obj)
    if own is not None:
        if wanted not in (None, POSITIONAL) and list(wanted) != own.names:
            raise CheckpointError(
                f"checkpoint {path} names its variables ({own.source}: {own.names}) but train.init_variables "
                f"lists {list(wanted)}: remove train.init_variables (the checkpoint's own names are used)")
        return own
    if given == POSITIONAL:
        return CheckpointNames(None, "positional (train.init_variables)")
    if wanted is not None:
        return CheckpointNames(list(wanted), f"train.init_variables{' (climax)' if given == CLIMAX else ''}")
    return None


def unnamed_error(path: str, n_ckpt: int, model_vars: Sequence[str]) -> CheckpointError:
    """What to do with a checkpoint that has variable embeddings but no names for them."""
    return CheckpointError(
        f"checkpoint {path} has {n_ckpt} variable embeddings but does not name its variables (no config.data."
        "variables, top-level `variables` or hyper_parameters default_vars), and they are never matched by position "
        f"silently: set train.init_variables to its {n_ckpt} names in its order (ClimaX/ERA5 names such as "
        f"10m_u_component_of_wind are understood; `{CLIMAX}` = ClimaX's default_vars), or to `{POSITIONAL}` if "
        f"checkpoint variable j is model variable j ({list(model_vars)[:n_ckpt]})")
