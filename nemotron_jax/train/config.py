"""Recipe types: one per kind, composed of the parts every kind shares.

    RunConfig   what the one loop needs: output_dir, seed, steps, logging, checkpoints, resume,
                and the shared parts `model` (source + `Policy` + `quantize`), `optimizer`, `mesh`,
                `lora` (rank 0: full fine-tuning; else only adapters train, on a frozen base)
    LMRecipe    + `data`                      kinds lm (pretraining), cpt, sft
    KDRecipe    + `teacher`, `kd`             kind kd
    (rl/config.py adds GRPORecipe and DPORecipe; `nemotron_jax.recipes` loads any of them by kind.)

The YAML stays flat: run fields at the top, one section per part. Loading goes through
`typed_yaml` (unknown keys and wrong types are errors naming the dotted key) and `validate()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from nemotron_jax.data.pipeline import DataConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.lora import LoRAConfig
from nemotron_jax.model.transformer import Policy
from nemotron_jax.sharding import MeshConfig
from nemotron_jax.train.optim import OptimizerConfig

Dtype = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelSpec(Policy):
    """The model a recipe trains: `source` (a preset name, initialised from the recipe's `seed`;
    an HF directory; or a saved model directory) plus how it computes (the `Policy` fields).
    `dtype` in YAML is `Policy.param_dtype`. `quantize` (int8 | int4) stores the projection weights
    quantized (`nemotron_jax.quantize`): a frozen QLoRA base, so it needs `lora.rank` > 0."""

    source: str = "tiny-llama"
    quantize: Literal["int8", "int4"] | None = None
    yaml_aliases: ClassVar[dict[str, str]] = {"dtype": "param_dtype"}  # YAML key -> field (typed_yaml)

    def policy(self) -> Policy:
        return Policy(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Policy)})


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

    def model(self) -> ModelSpec:
        return ModelSpec(source=self.source, param_dtype=self.dtype, compute_dtype=self.compute_dtype)


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
class RunConfig:
    """The fields of every recipe kind. `steps` counts what the loop iterates over: batches for
    data recipes, rollout iterations for RL. `resume`: `auto` continues a run in `output_dir`
    only if its recorded `config.yaml` matches; `force` continues it anyway and records the
    change; `never` refuses an `output_dir` that holds a run."""

    kind: str = "lm"
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
    resume: Literal["auto", "force", "never"] = "auto"
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

    def validate(self) -> None:
        self.lora.validate()
        if self.model.quantize and not self.lora.rank:
            raise ConfigError(f"model.quantize={self.model.quantize} freezes the base: training it needs LoRA "
                              "(set lora.rank > 0)")
        for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
                     "loss_chunk_tokens", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0 (0: never), got {self.eval_every}")
        self.optimizer.validate()


@dataclasses.dataclass(frozen=True)
class LMRecipe(RunConfig):
    """Next-token cross-entropy on the weighted tokens: `lm` (pretraining) and `cpt` on text,
    `sft` on chats (assistant tokens only, with the reasoning toggle)."""

    kind: Literal["lm", "cpt", "sft"] = "lm"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def validate(self) -> None:
        super().validate()
        if self.data.seq_len < 1 or self.data.batch_size < 1:
            raise ConfigError("data.seq_len and data.batch_size must be >= 1")
        if self.data.batch_size % self.optimizer.grad_accum:
            raise ConfigError(f"data.batch_size={self.data.batch_size} must be a multiple of "
                              f"optimizer.grad_accum={self.optimizer.grad_accum}")


@dataclasses.dataclass(frozen=True)
class KDRecipe(LMRecipe):
    """Distillation from a frozen `teacher` (KL + optional cosine and LM terms, `kd`)."""

    kind: Literal["kd"] = "kd"  # type: ignore[assignment]
    teacher: TeacherSpec = dataclasses.field(default_factory=TeacherSpec)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)

    def validate(self) -> None:
        super().validate()
        if not self.teacher.source:
            raise ConfigError("kind: kd needs teacher.source (a preset to pretrain, an HF or saved model dir)")
        if self.kd.temperature <= 0:
            raise ConfigError(f"kd.temperature must be > 0, got {self.kd.temperature}")


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """The recipe as plain YAML-able data, with `model.param_dtype` spelled `dtype` as in YAML."""
    data = _lists(dataclasses.asdict(recipe))
    model = data.get("model")
    if isinstance(model, dict) and "param_dtype" in model:
        data["model"] = {"source": model.pop("source"), "dtype": model.pop("param_dtype"), **model}
    return data


def _lists(value: Any) -> Any:
    """Tuples as lists (what YAML reads back), so a recorded config compares equal to its recipe."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value
