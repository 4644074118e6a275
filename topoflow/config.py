"""Reading an experiment file: YAML, `--set` overrides, typed validation with errors naming the key.

One YAML file describes a whole experiment (sections `data`, `build`, `shard`, `model`, `train`,
`evaluate`, `ablate`); each package validates the sections it owns against pydantic models derived
from `Strict`, so an unknown key or a wrong type is an error naming the dotted key, where it came
from (the file or a `--set`), and the nearest valid key for a typo.

Files and `--set` values are read as YAML 1.2 (ruamel.yaml's safe loader): `1e3` is a number, and
YAML 1.1's surprises (`on` -> True, `02:00:00` -> 7200) do not happen.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from topoflow.errors import ConfigError
from topoflow.files import sha256_json

TOP_LEVEL_SECTIONS = ("data", "build", "shard", "model", "train", "evaluate", "ablate")
Model = TypeVar("Model", bound=BaseModel)
_YAML = YAML(typ="safe", pure=True)


class Strict(BaseModel):
    """Base of every config section and record: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass --config with an existing YAML file")
    try:
        raw = _YAML.load(path.read_text())
    except YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections {TOP_LEVEL_SECTIONS}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown top-level key(s) {unknown}; allowed: {TOP_LEVEL_SECTIONS}")
    return raw


def write_yaml(raw: dict[str, Any], path: str | Path) -> Path:
    """Write a raw config dict as YAML 1.2 (block style, keys in their order); returns the path."""
    dumper = YAML(typ="safe", pure=True)
    dumper.default_flow_style = False
    dumper.sort_base_mapping_type_on_output = False
    with open(path, "w") as fh:
        dumper.dump(raw, fh)
    return Path(path)


def add_override_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """The `--set KEY=VALUE` option every command shares (collected in `args.overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable; value parsed as YAML)")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides (value parsed as YAML 1.2) to a raw config dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        if keys[0] not in TOP_LEVEL_SECTIONS:
            near = difflib.get_close_matches(keys[0], TOP_LEVEL_SECTIONS, n=1)
            raise ConfigError(f"--set {item!r}: unknown section {keys[0]!r}" +
                              (f"; did you mean {near[0]!r}?" if near else f"; allowed: {TOP_LEVEL_SECTIONS}"))
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key!r} is not a section")
        try:
            node[keys[-1]] = _YAML.load(value)
        except YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return raw


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that the error location `loc` points into, for "did you mean"."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = fields[part].annotation
        while typing.get_origin(current) in (list, dict, typing.Union, types.UnionType):
            args = [a for a in typing.get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
            current = args[0] if args else typing.get_args(current)[-1]
    return list(getattr(current, "model_fields", {}))


def _error_line(model: type[BaseModel], err: dict[str, Any], source: str, overrides: list[str]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(root)"
    given = [o for o in overrides if key == o.split("=", 1)[0] or key.startswith(o.split("=", 1)[0] + ".")]
    origin = f"from --set {given[-1]}" if given else f"in {source}"
    if err["type"] != "extra_forbidden":
        return f"  {key} ({origin}): {err['msg']}"
    near = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc), n=1)
    hint = f"; did you mean {'.'.join(str(p) for p in loc[:-1] + (near[0],))}?" if near else ""
    return f"  {key} ({origin}): unknown key{hint}"


def validate_section(model: type[Model], raw: dict[str, Any], source: str, overrides: list[str] | None = None) -> Model:
    """Validate raw data against a model; pydantic's errors become one ConfigError line per dotted key,
    saying whether it came from the file or from a --set, with the nearest valid key for a typo."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = ["invalid configuration:"] + [_error_line(model, err, source, overrides or []) for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_sections(model: type[Model], path: str | Path, overrides: list[str] | None, sections: tuple[str, ...]) -> Model:
    """Read `path`, apply overrides and validate the given top-level sections against `model`."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_section(model, {k: raw[k] for k in sections if k in raw}, str(path), overrides)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config sections as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (before, after) for every value that differs between two nested configs."""
    old, new = flatten(before), flatten(after)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def config_hash(config: BaseModel) -> str:
    """Stable short hash of a config section, recorded in provenance to detect changed configs."""
    return sha256_json(config.model_dump(mode="json"))[:16]
