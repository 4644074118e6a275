"""Reading an experiment file: YAML, `--set` overrides, typed validation with errors naming the key.

One YAML file describes a whole experiment (sections `data`, `build`, `shard`, `model`, `train`,
`evaluate`, `ablate`); each package validates the sections it owns against pydantic models derived
from `Strict`, so an unknown key or a wrong type is an error naming the dotted key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from topoflow.errors import ConfigError
from topoflow.files import sha256_json

TOP_LEVEL_SECTIONS = ("data", "build", "shard", "model", "train", "evaluate", "ablate")
Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config section and record: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass --config with an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections {TOP_LEVEL_SECTIONS}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown top-level key(s) {unknown}; allowed: {TOP_LEVEL_SECTIONS}")
    return raw


def add_override_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """The `--set KEY=VALUE` option every command shares (collected in `args.overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable; value parsed as YAML)")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides (value parsed as YAML) to a raw config dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        if keys[0] not in TOP_LEVEL_SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {keys[0]!r}; allowed: {TOP_LEVEL_SECTIONS}")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(value)
    return raw


def validate_section(model: type[Model], raw: dict[str, Any], source: str) -> Model:
    """Validate raw data against a model; pydantic's errors become one ConfigError line per dotted key."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [f"invalid configuration in {source}:"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_sections(model: type[Model], path: str | Path, overrides: list[str] | None, sections: tuple[str, ...]) -> Model:
    """Read `path`, apply overrides and validate the given top-level sections against `model`."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_section(model, {k: raw[k] for k in sections if k in raw}, str(path))


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
