"""Recipes as typed dataclasses, loaded from YAML and `key=value` overrides, validated strictly.

An unknown key, or a value of the wrong type, is an error naming the dotted key (`optimizer.lr`)
and what was expected, so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from nemotron_jax.data.pipeline import DataConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.rl.config import DPOConfig, GRPOConfig, PromptConfig, SamplingConfig, StartConfig
from nemotron_jax.sharding import MeshConfig
from nemotron_jax.train.optim import OptimizerConfig

Kind = Literal["kd", "cpt", "sft", "lm", "grpo", "dpo"]
Dtype = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """`source`: a preset name (random init from `seed`), an HF directory, or a saved model
    directory (`nj.load`). The rest is the `Policy` (how it computes)."""

    source: str = "tiny-llama"
    dtype: Dtype = "float32"
    compute_dtype: Dtype | None = None
    remat: str = "none"
    scan_layers: bool = False
    attention_impl: str = "xla"
    ffn_impl: str = "xla"


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """The frozen KD teacher. With `pretrain_steps` > 0, `source` must be a preset: it is first
    trained (`lm`, on the recipe's data, `pretrain_lr`) in `{output_dir}/teacher`, a resumable
    stage of its own, and the result is the teacher."""

    source: str = ""
    pretrain_steps: int = 0
    pretrain_lr: float = 3e-3
    dtype: Dtype = "float32"
    compute_dtype: Dtype | None = None


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """Loss = kl_weight·KL(teacher‖student at temperature) + cosine_weight·(1−cos) + lm_weight·CE.

    The cosine term compares the final-normed hidden states (a Puzzle child and its parent may
    differ in depth, so per-layer pairs need not exist); it needs equal hidden sizes. `top_k`
    keeps only the teacher's k most likely tokens (renormalised)."""

    temperature: float = 1.0
    kl_weight: float = 1.0
    cosine_weight: float = 0.0
    lm_weight: float = 0.0
    top_k: int | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training run. `kind`: `lm` (pretraining), `cpt` (continued pretraining), `sft`
    (cross-entropy on assistant tokens), `kd` (distillation from `teacher`), `grpo` (on-policy RL
    with `grpo`, `sampling`, `prompts`, `start`) or `dpo` (preference optimisation with `dpo`)."""

    kind: Kind = "lm"
    output_dir: str = "outputs/run"
    seed: int = 0
    steps: int = 100
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    max_nonfinite_steps: int = 10
    loss_chunk_tokens: int = 4096
    peak_tflops: float = 0.0
    progress: bool = True
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    teacher: TeacherSpec = dataclasses.field(default_factory=TeacherSpec)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    start: StartConfig = dataclasses.field(default_factory=StartConfig)
    prompts: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)

    def validate(self) -> None:
        for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
                     "loss_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data.seq_len < 1 or self.data.batch_size < 1:
            raise ConfigError("data.seq_len and data.batch_size must be >= 1")
        if self.data.batch_size % self.optimizer.grad_accum:
            raise ConfigError(f"data.batch_size={self.data.batch_size} must be a multiple of "
                              f"optimizer.grad_accum={self.optimizer.grad_accum}")
        if self.kind == "kd" and not self.teacher.source:
            raise ConfigError("kind: kd needs teacher.source (a preset to pretrain, an HF or saved model dir)")
        if self.kd.temperature <= 0:
            raise ConfigError(f"kd.temperature must be > 0, got {self.kd.temperature}")


# ---------------------------------------------------------------- loading and validation
def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """`cls(**data)` with every key checked against the dataclass fields and their types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]!s}; expected one of {', '.join(names)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()})


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
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


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """A validated `Recipe` from a YAML file (or defaults when None) plus overrides."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of keys to values")
    recipe = from_dict(Recipe, apply_overrides(data, overrides))
    recipe.validate()
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
