"""Policy-optimisation objectives as pure functions of per-token log-probabilities.

GRPO / RLOO advantages, the clipped importance-ratio loss with a k3 KL penalty, and the DPO / RPO
preference losses. Every function takes already-gathered log-probabilities, so the same code
serves any model; tests/test_rl_objectives.py checks each against float64 numpy.
Legend: P prompts, G responses per prompt, B = P*G sequences, T response tokens.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Aggregation = Literal["token", "sequence"]


def group_advantages(rewards_PxG: jax.Array, kind: Literal["grpo", "rloo"] = "grpo",
                     normalize_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """Advantages per response from its group's rewards.

    grpo: (r - mean) / (std + eps). rloo: r - mean of the *other* responses (leave-one-out), divided
    by the leave-one-out std + eps when `normalize_std` and that std > 0. A group whose rewards are
    all equal gets zero advantage either way: it carries no signal.
    """
    r = rewards_PxG.astype(jnp.float32)
    g = r.shape[-1]
    if kind == "grpo":
        centred = r - r.mean(axis=-1, keepdims=True)
        if not normalize_std:
            return centred
        return centred / (r.std(axis=-1, keepdims=True) + eps)
    if kind != "rloo":
        raise ValueError(f"advantage kind must be 'grpo' or 'rloo', got {kind!r}")
    if g < 2:
        raise ValueError("leave-one-out needs at least 2 responses per prompt")
    others_mean = (r.sum(axis=-1, keepdims=True) - r) / (g - 1)
    adv = r - others_mean
    if not normalize_std:
        return adv
    others_sq = ((r * r).sum(axis=-1, keepdims=True) - r * r) / (g - 1)
    others_std = jnp.sqrt(jnp.maximum(others_sq - others_mean**2, 0.0))
    return jnp.where(others_std > 0, adv / (others_std + eps), adv)


def masked_mean(x_BxT: jax.Array, mask_BxT: jax.Array, aggregation: Aggregation) -> jax.Array:
    """token: mean over every valid token of the batch; sequence: mean over sequences of their token means."""
    mask = mask_BxT.astype(jnp.float32)
    if aggregation == "token":
        return (x_BxT * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if aggregation != "sequence":
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    per_seq = (x_BxT * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    has_tokens = (mask.sum(-1) > 0).astype(jnp.float32)
    return (per_seq * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)


def k3_kl(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(pi || ref): exp(r) - 1 - r with r = log ref - log pi (>= 0, unbiased)."""
    r = ref_logp_BxT - logp_BxT
    return jnp.exp(r) - 1.0 - r


def grpo_per_token(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_BxT: jax.Array,
                   ref_logp_BxT: jax.Array | None = None, *, clip_low: float = 0.2, clip_high: float = 0.2,
                   kl_coef: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-token loss, per-token k3 KL (0 without a reference), clipped indicator) of the clipped
    importance-ratio objective -min(r·A, clip(r, 1-clip_low, 1+clip_high)·A) + kl_coef·KL."""
    ratio = jnp.exp(logp_BxT - old_logp_BxT)
    adv = advantages_BxT.astype(jnp.float32)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(per_token) if ref_logp_BxT is None else k3_kl(logp_BxT, ref_logp_BxT)
    return per_token + kl_coef * kl, kl, (clipped < unclipped).astype(jnp.float32)


def grpo_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_B: jax.Array, mask_BxT: jax.Array,
              ref_logp_BxT: jax.Array | None = None, *, clip_low: float = 0.2, clip_high: float = 0.2,
              kl_coef: float = 0.0, aggregation: Aggregation = "token") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss aggregated over response tokens (`mask`), and its metrics."""
    per_token, kl, clipped = grpo_per_token(
        logp_BxT, old_logp_BxT, jnp.broadcast_to(advantages_B[:, None], logp_BxT.shape), ref_logp_BxT,
        clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef)
    metrics = {"clip_fraction": masked_mean(clipped, mask_BxT, "token"),
               "ratio_mean": masked_mean(jnp.exp(logp_BxT - old_logp_BxT), mask_BxT, "token")}
    if ref_logp_BxT is not None:
        metrics["kl"] = masked_mean(kl, mask_BxT, "token")
    return masked_mean(per_token, mask_BxT, aggregation), metrics


def aggregation_weights(mask_BxT: jax.Array, aggregation: Aggregation) -> jax.Array:
    """Per-token weights w with Σ w·loss / Σ w equal to `masked_mean(loss, mask, aggregation)`.

    This is how the one train step (which divides a weighted sum by the total weight) does
    sequence-level aggregation: each sequence's tokens share a total weight of 1.
    """
    mask = mask_BxT.astype(jnp.float32)
    if aggregation == "token":
        return mask
    if aggregation != "sequence":
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    return mask / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)


def preference_loss(chosen_logp_B: jax.Array, rejected_logp_B: jax.Array, ref_chosen_logp_B: jax.Array,
                    ref_rejected_logp_B: jax.Array, *, beta: float = 0.1,
                    kind: Literal["dpo", "rpo_bwd_kl", "rpo_sq"] = "dpo",
                    reward_gap_B: jax.Array | None = None, eta: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO, or reward-aware RPO, from summed response log-probabilities under policy and reference.

    dpo: -log sigmoid(beta * margin). rpo_*: match the policy's implied reward gap beta * margin to
    the reward model's gap eta * (r_chosen - r_rejected), by the backward KL between the two
    Bernoulli preferences (rpo_bwd_kl) or by squared distance (rpo_sq).
    """
    margin = (chosen_logp_B - ref_chosen_logp_B) - (rejected_logp_B - ref_rejected_logp_B)
    implied = beta * margin
    metrics = {"margin": margin.mean(), "preference_accuracy": (margin > 0).astype(jnp.float32).mean()}
    if kind == "dpo":
        return -jax.nn.log_sigmoid(implied).mean(), metrics
    if reward_gap_B is None:
        raise ValueError(f"{kind} needs reward_gap_B (reward of chosen minus rejected)")
    target = eta * reward_gap_B
    if kind == "rpo_sq":
        return ((implied - target) ** 2).mean(), metrics
    if kind == "rpo_bwd_kl":
        p, log_q, log_1mq = jax.nn.sigmoid(target), jax.nn.log_sigmoid(implied), jax.nn.log_sigmoid(-implied)
        loss = p * (jax.nn.log_sigmoid(target) - log_q) + (1 - p) * (jax.nn.log_sigmoid(-target) - log_1mq)
        return loss.mean(), metrics
    raise ValueError(f"preference loss kind must be dpo, rpo_bwd_kl or rpo_sq, got {kind!r}")
