"""GRPO and DPO/RPO as strategies over the one train step (`nemotron_jax.train.step`).

A strategy returns Σ weight·loss and the step divides by Σ weights, so:
- GRPO batches carry `weights` = aggregation weights over response tokens (token-level: the
  mask; sequence-level: mask / response length), `old_logprobs` and per-token `advantages`.
- DPO batches interleave chosen (even rows) and rejected (odd rows) responses to the same prompt;
  `response_mask` marks response targets and `weights` give each pair a total weight of 1.
The frozen reference policy is the step's "teacher": it runs inside the same jitted step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nemotron_jax.data.batch import PairBatch, PolicyBatch, TokenBatch
from nemotron_jax.model.transformer import Transformer
from nemotron_jax.rl.objectives import Aggregation, grpo_per_token, preference_loss
from nemotron_jax.train.losses import chunked_map, lm_head, logits_chunk


def target_logprobs(module: Transformer, batch: TokenBatch, chunk: int = 4096,
                   with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """log p(target) per position [B, T] (and the entropy of each next-token distribution)."""
    h_BxTxD, _ = module.hidden_states(batch.inputs, batch.positions, batch.segment_ids)
    b, t, d = h_BxTxD.shape
    head = lm_head(module)

    def fn(h_KxD, targets_K):
        logits_KxV = logits_chunk(h_KxD, head)
        logp_KxV = jax.nn.log_softmax(logits_KxV, axis=-1)
        picked_K = jnp.take_along_axis(logp_KxV, targets_K[:, None], axis=-1)[:, 0]
        entropy_K = -jnp.sum(jnp.exp(logp_KxV) * logp_KxV, axis=-1) if with_entropy else jnp.zeros_like(picked_K)
        return picked_K, entropy_K

    logp_N, entropy_N = chunked_map(fn, chunk, h_BxTxD.reshape(b * t, d), batch.targets.reshape(-1))
    return logp_N.reshape(b, t), entropy_N.reshape(b, t) if with_entropy else None


@dataclasses.dataclass(frozen=True)
class GRPOStrategy:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    aggregation: Aggregation = "token"
    chunk_tokens: int = 4096

    @property
    def needs_teacher(self) -> bool:
        return self.kl_coef > 0

    def loss(self, module: Transformer, batch: PolicyBatch, teacher: Transformer | None) -> tuple[jax.Array, dict]:
        logp, entropy = target_logprobs(module, batch, self.chunk_tokens, with_entropy=True)
        ref = None
        if teacher is not None:
            ref = jax.lax.stop_gradient(target_logprobs(teacher, batch, self.chunk_tokens)[0])
        per_token, kl, clipped = grpo_per_token(logp, batch.old_logprobs, batch.advantages, ref,
                                                clip_low=self.clip_low, clip_high=self.clip_high,
                                                kl_coef=self.kl_coef)
        w = batch.weights
        valid = w > 0
        wsum = lambda x: jnp.sum(jnp.where(valid, x, 0.0) * w)
        sums = {"kl": wsum(kl), "clip_fraction": wsum(clipped), "entropy": wsum(jax.lax.stop_gradient(entropy)),
                "logprob_mismatch": wsum(jnp.abs(jax.lax.stop_gradient(logp) - batch.old_logprobs))}
        return wsum(per_token), sums


@dataclasses.dataclass(frozen=True)
class PreferenceStrategy:
    """DPO (`kind="dpo"`) or reward-aware RPO (`rpo_bwd_kl`, `rpo_sq`; needs `reward_gap` rows)."""

    beta: float = 0.1
    kind: str = "dpo"
    eta: float = 1.0
    chunk_tokens: int = 4096
    needs_teacher: bool = True

    def loss(self, module: Transformer, batch: PairBatch, teacher: Transformer | None) -> tuple[jax.Array, dict]:
        if teacher is None:
            raise ValueError("preference optimisation needs the frozen reference policy")
        mask = batch.response_mask.astype(jnp.float32)
        seq = lambda logp: jnp.sum(jnp.where(mask > 0, logp, 0.0), axis=-1)
        policy_B = seq(target_logprobs(module, batch, self.chunk_tokens)[0])
        ref_B = jax.lax.stop_gradient(seq(target_logprobs(teacher, batch, self.chunk_tokens)[0]))
        loss, metrics = preference_loss(policy_B[0::2], policy_B[1::2], ref_B[0::2], ref_B[1::2], beta=self.beta,
                                        kind=self.kind, reward_gap_B=batch.reward_gap[0::2, 0], eta=self.eta)
        pairs = policy_B.shape[0] // 2
        return loss * pairs, {k: v * pairs for k, v in metrics.items()}
