"""Typed YAML configs: dataclasses loaded from YAML plus dotted `key=value` overrides, strictly.

An unknown key, or a value of the wrong type, is an error naming the dotted key (`optimizer.lr`)
and what was expected, so that a typo never silently falls back to a default. Recipes, Puzzle
configs and every other YAML the project reads go through `load_yaml`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from nemotron_jax.errors import ConfigError

T = TypeVar("T")


def load_yaml(cls: type[T], path: str | Path | None, overrides: Sequence[str] = (), what: str = "config") -> T:
    """`cls` from a YAML file (or its defaults when `path` is None) with overrides applied."""
    data = read_yaml(path, what) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad YAML or a non-mapping is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of keys to values")
    return data


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """`cls(**data)` with every key checked against the dataclass fields and their types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    aliases = getattr(cls, "yaml_aliases", {})  # YAML key -> field name, for fields inherited under another name
    data = {aliases.get(k, k): v for k, v in data.items()}
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        spelled = [next((a for a, f in aliases.items() if f == n), n) for n in names]
        raise ConfigError(f"unknown key {where}{unknown[0]!s}; expected one of {', '.join(spelled)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}{next((a for a, f in aliases.items() if f == k), k)}")
                  for k, v in data.items()})


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    if tp not in (bool, int, float, str):
        raise ConfigError(f"{key}: unsupported field type {tp}")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optimizer.lr=1e-5")
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data
