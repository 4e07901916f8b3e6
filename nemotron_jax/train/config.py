"""Recipes as typed dataclasses, loaded from YAML and `key=value` overrides, validated strictly.

An unknown key, or a value of the wrong type, is an error naming the dotted key (`optimizer.lr`)
and what was expected, so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from nemotron_jax.data.pipeline import DataConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.rl.config import DPOConfig, GRPOConfig, PromptConfig, SamplingConfig, StartConfig
from nemotron_jax.sharding import MeshConfig
from nemotron_jax.train.optim import OptimizerConfig
from nemotron_jax.typed_yaml import load_yaml

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


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """A validated `Recipe` from a YAML file (or defaults when None) plus overrides."""
    recipe = load_yaml(Recipe, path, overrides, what="recipe")
    recipe.validate()
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
