"""Named model presets (`configs/models/*.yaml`) and resolving "a model" from a name or a path."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from nemotron_jax.config import ModelConfig
from nemotron_jax.errors import ConfigError

SAVED_CONFIG = "model_config.json"  # written by Model.save beside the Orbax parameters


def configs_dir() -> Path:
    """`configs/` shipped with the package (wheel) or beside it (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("cannot find the configs/ directory of nemotron-jax")


def preset_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))


def preset(name: str) -> ModelConfig:
    """A preset by name, e.g. `ln-super-49b` or `tiny-hetero`."""
    path = configs_dir() / "models" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}")
    return ModelConfig.from_dict(yaml.safe_load(path.read_text()), where=str(path))


def resolve_config(source: str | Path) -> ModelConfig:
    """A preset name, a config.json, an HF directory, or a directory written by `Model.save`."""
    path = Path(source)
    if path.is_dir() and (path / SAVED_CONFIG).is_file():
        return read_saved_config(path)
    if path.exists():
        return ModelConfig.from_hf(path)
    if "/" not in str(source) and str(source) in preset_names():
        return preset(str(source))
    raise ConfigError(f"{source}: not a file, a model directory or a preset "
                      f"(presets: {', '.join(preset_names())})")


def read_saved_config(path: Path) -> ModelConfig:
    file = path / SAVED_CONFIG
    try:
        return ModelConfig.from_dict(json.loads(file.read_text()), where=str(file))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
