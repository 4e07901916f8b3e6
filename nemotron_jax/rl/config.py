"""The RL and preference recipe types (`grpo`, `dpo`) and their sections.

Both are a `train.config.RunConfig` (run fields, model, optimiser, mesh) plus what on-policy and
preference training add: where the policy starts, the prompts, how responses are sampled, and
the algorithm's own settings. Loaded by kind through `nemotron_jax.recipes`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from nemotron_jax.errors import ConfigError
from nemotron_jax.sharding import MeshConfig
from nemotron_jax.train.config import RunConfig


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    path: str = "synthetic:arith"          # JSONL with question/answer (GSM8K works as is), or synthetic:KIND
    # Records in a benchmark's own schema (gsm8k, math, mcq, ifeval, code; nemotron_jax.eval.benchmarks):
    # its template gives the user turn and its grader the accuracy reward, exactly as in evaluation.
    benchmark: str = ""
    thinking_ratio: float = 0.5            # fraction of prompts asked with `detailed thinking on`
    max_pass_rate: float | None = None     # drop prompts solved at least this often (e.g. 0.75)
    pass_rate_samples: int = 4
    curriculum: bool = False
    curriculum_start: float = 0.9          # Gaussian centre (pass rate) at the first iteration
    curriculum_end: float = 0.1            # ... and at the last
    curriculum_width: float = 0.25
    limit: int | None = None               # use the first N records only
    # Held-out prompts, sampled every `eval_every` iterations (both modes, `heldout_*` metrics):
    eval_path: str | None = None           # a JSONL of question/answer, or
    eval_examples: int = 0                 # ... that many problems of the synthetic task's test split


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (SPEC §4: temperature 1, top-p 1 for reasoning RL)."""

    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    max_thinking_tokens: int | None = None
    format_weight: float = 1.0  # reward = accuracy + format_weight * format
    reward: str = ""            # or a user function "module:function" (response, answer, thinking, prompt) -> float
    reward_timeout_s: float = 10.0
    rollout_mesh: MeshConfig | None = None  # generate on another layout (weights resharded in memory)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Ultra used 72 prompts x 16 responses and 2 updates per rollout (SPEC §4); tiny defaults here."""

    prompts_per_iteration: int = 8
    updates_per_iteration: int = 2
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    aggregation: Literal["token", "sequence"] = "token"
    advantage: Literal["grpo", "rloo"] = "grpo"
    normalize_std: bool = True
    skip_flat_groups: bool = True  # drop groups with all-equal rewards from the update (no gradient without KL)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Nano used offline RPO (lr 7e-7, KL 3e-2); chat alignment used online RPO (SPEC §4)."""

    loss: Literal["dpo", "rpo_bwd_kl", "rpo_sq"] = "dpo"
    beta: float = 0.1
    eta: float = 1.0
    online: bool = False
    pairs_path: str = "synthetic:pairs"  # offline: JSONL of {question|prompt|input, chosen, rejected}
    pairs_per_iteration: int = 8
    updates_per_iteration: int = 1
    seq_len: int | None = None  # pad/truncate rows to this many tokens (default: a bucket of the longest)


@dataclasses.dataclass(frozen=True)
class StartConfig:
    """Where the policy starts. With `sft_steps` > 0 the recipe's `model.source` is first trained by
    reasoning SFT on `sft_data` (both toggle modes) in `{output_dir}/sft`, a resumable stage of its
    own: RL needs a policy that already produces answers to reward."""

    sft_steps: int = 0
    sft_data: str = "synthetic:arith"
    sft_lr: float = 3e-3
    sft_batch_size: int = 8
    sft_seq_len: int = 256


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """RL recipes read no training files; their `data` section names only the tokenizer."""

    tokenizer: str = "tiny"


@dataclasses.dataclass(frozen=True)
class RLRecipe(RunConfig):
    """What GRPO and DPO share: `steps` are iterations (one batch of rollouts or pairs each)."""

    data: TokenizerSpec = dataclasses.field(default_factory=TokenizerSpec)
    start: StartConfig = dataclasses.field(default_factory=StartConfig)
    prompts: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def validate(self) -> None:
        super().validate()
        s = self.sampling
        if s.group_size < 1 or s.max_new_tokens < 1:
            raise ConfigError("sampling.group_size and sampling.max_new_tokens must be >= 1")
        if s.temperature < 0 or not 0 < s.top_p <= 1:
            raise ConfigError(f"sampling.temperature must be >= 0 and top_p in (0, 1], got {s.temperature}, {s.top_p}")
        if not 0 <= self.prompts.thinking_ratio <= 1:
            raise ConfigError(f"prompts.thinking_ratio must lie in [0, 1], got {self.prompts.thinking_ratio}")
        if s.rollout_mesh is not None and self.model.quantize:
            raise ConfigError("sampling.rollout_mesh with model.quantize is not supported (quantized weights are "
                              "not resharded yet): drop one of them")


@dataclasses.dataclass(frozen=True)
class GRPORecipe(RLRecipe):
    """On-policy RL: GRPO or RLOO advantages, clipped ratio, optional KL to the start policy."""

    kind: Literal["grpo"] = "grpo"  # type: ignore[assignment]
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)

    def validate(self) -> None:
        super().validate()
        g = self.grpo
        if g.prompts_per_iteration < 1 or g.updates_per_iteration < 1:
            raise ConfigError("grpo.prompts_per_iteration and grpo.updates_per_iteration must be >= 1")
        if g.clip_low < 0 or g.clip_high < 0 or g.kl_coef < 0:
            raise ConfigError("grpo.clip_low, grpo.clip_high and grpo.kl_coef must be >= 0")


@dataclasses.dataclass(frozen=True)
class DPORecipe(RLRecipe):
    """Preference optimisation (DPO / RPO) on offline pairs or online best-vs-worst rollouts."""

    kind: Literal["dpo"] = "dpo"  # type: ignore[assignment]
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)

    def validate(self) -> None:
        super().validate()
        d = self.dpo
        if d.beta <= 0 or d.pairs_per_iteration < 1 or d.updates_per_iteration < 1:
            raise ConfigError("dpo.beta must be > 0; dpo.pairs_per_iteration, dpo.updates_per_iteration >= 1")
