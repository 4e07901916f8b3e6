"""Training algorithms as strategies over the one train step: what loss a batch gives.

A strategy maps (student module, batch, frozen teacher or None) to the *sum* over tokens of its
weighted per-token loss, plus named weighted sums for metrics. The step divides by the batch's
total weight, which keeps gradient accumulation exact (microbatch sums add up to the full batch).

    lm   next-token cross-entropy on every weighted token: pretraining, continued pretraining
         (`cpt`) and SFT (`sft`, where the weights are the assistant-token loss mask)
    kd   knowledge distillation from a frozen teacher run inside the same step: forward
         KL(teacher‖student) at a temperature, optional top-k teacher, optional cosine loss on
         final hidden states and optional LM term (SPEC §5: KL + cosine, 1:1, LM hurt)
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from nemotron_jax.data.batch import TokenBatch as Batch
from nemotron_jax.model.transformer import Transformer
from nemotron_jax.train.losses import cosine_per_token, cross_entropy_per_token, kd_per_token, lm_head

Sums = dict[str, jax.Array]


class Strategy(Protocol):
    needs_teacher: bool

    def loss(self, module: Transformer, batch: Batch, teacher: Transformer | None) -> tuple[jax.Array, Sums]:
        """(Σ weight·loss over tokens, {metric: Σ weight·value}) for one (micro)batch."""
        ...


def _hidden_N(module: Transformer, batch: Batch) -> jax.Array:
    h_BxTxD, _ = module.hidden_states(batch.inputs, batch.positions, batch.segment_ids)
    return h_BxTxD.reshape(-1, h_BxTxD.shape[-1])


def _weighted_sum(values_N: jax.Array, weights_N: jax.Array) -> jax.Array:
    """Σ w·v with zero-weight tokens (padding) contributing exactly 0, even if v is inf there."""
    return jnp.sum(jnp.where(weights_N > 0, values_N, 0.0) * weights_N)


@dataclasses.dataclass(frozen=True)
class LMStrategy:
    chunk_tokens: int = 4096
    needs_teacher: bool = False

    def loss(self, module: Transformer, batch: Batch, teacher: Transformer | None = None) -> tuple[jax.Array, Sums]:
        weights_N = batch.weights.reshape(-1)
        ce_N = cross_entropy_per_token(_hidden_N(module, batch), lm_head(module), batch.targets.reshape(-1),
                                       self.chunk_tokens)
        ce = _weighted_sum(ce_N, weights_N)
        return ce, {"ce": ce}


@dataclasses.dataclass(frozen=True)
class KDStrategy:
    temperature: float = 1.0
    kl_weight: float = 1.0
    cosine_weight: float = 0.0
    lm_weight: float = 0.0
    top_k: int | None = None
    chunk_tokens: int = 4096
    needs_teacher: bool = True

    def loss(self, module: Transformer, batch: Batch, teacher: Transformer | None) -> tuple[jax.Array, Sums]:
        if teacher is None:
            raise ValueError("the kd strategy needs a teacher")
        weights_N = batch.weights.reshape(-1)
        h_NxD = _hidden_N(module, batch)
        teacher_h_NxD = jax.lax.stop_gradient(_hidden_N(teacher, batch))
        kl_N, ce_N = kd_per_token(h_NxD, lm_head(module), teacher_h_NxD, jax.lax.stop_gradient(lm_head(teacher)),
                                  batch.targets.reshape(-1), self.temperature, self.top_k, self.chunk_tokens)
        sums = {"kl": _weighted_sum(kl_N, weights_N), "ce": _weighted_sum(ce_N, weights_N)}
        total = self.kl_weight * sums["kl"] + self.lm_weight * sums["ce"]
        if self.cosine_weight:
            sums["cos"] = _weighted_sum(cosine_per_token(h_NxD, teacher_h_NxD), weights_N)
            total = total + self.cosine_weight * sums["cos"]
        return total, sums


def check_teacher(student: Transformer, teacher: Transformer, strategy: KDStrategy) -> None:
    """Fail early, with the reason, when a teacher cannot teach this student."""
    s, t = student.config, teacher.config
    if s.vocab_size != t.vocab_size:
        raise ValueError(f"teacher vocab_size {t.vocab_size} != student vocab_size {s.vocab_size}; "
                         "KD compares distributions over the same vocabulary")
    if strategy.cosine_weight and s.hidden_size != t.hidden_size:
        raise ValueError(f"cosine loss needs equal hidden sizes (student {s.hidden_size}, teacher "
                         f"{t.hidden_size}); set kd.cosine_weight=0")
    if strategy.top_k is not None and not 0 < strategy.top_k <= t.vocab_size:
        raise ValueError(f"kd.top_k must lie in [1, {t.vocab_size}], got {strategy.top_k}")
