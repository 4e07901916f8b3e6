"""Choosing the next token from float32 logits: greedy, temperature, top-k, top-p.

The knobs are traced values (changing them does not recompile); only two booleans are static:
`greedy` (argmax, no randomness) and `truncate` (apply top-k / top-p, which costs one sort of the
vocabulary per row and step, so it is skipped when neither is asked for).

Legend: B batch rows, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    """Traced sampling knobs; `top_k` 0 means no top-k, `top_p` 1 means no nucleus cut."""

    temperature: jax.Array  # f32 scalar, > 0 when sampling
    top_k: jax.Array  # i32 scalar
    top_p: jax.Array  # f32 scalar in (0, 1]


def make_params(temperature: float, top_k: int, top_p: float) -> tuple[SamplingParams, bool, bool]:
    """Validated params plus the static flags (greedy, truncate) that select the code path."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    greedy = temperature == 0.0 or top_k == 1
    truncate = not greedy and (top_k > 0 or top_p < 1.0)
    params = SamplingParams(jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p))
    return params, greedy, truncate


def truncate_logits(logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with everything outside the top-k and then the top-p nucleus set to -inf.

    The nucleus is the smallest prefix of the (top-k) tokens, by decreasing probability, whose mass
    reaches `top_p`; it always holds at least the most likely token, so `top_p -> 0` is greedy.
    Ties at the cut-off are kept.
    """
    vocab = logits_BxV.shape[-1]
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    rank_V = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    sorted_BxV = jnp.where(rank_V < k, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = (mass_before_BxV < top_p) | (rank_V == 0)
    num_kept_B = jnp.sum(keep_BxV & (rank_V < k), axis=-1)
    threshold_B = jnp.take_along_axis(sorted_BxV, (num_kept_B - 1)[:, None], axis=-1)
    return jnp.where(logits_BxV >= threshold_B, logits_BxV, -jnp.inf)


def sample(logits_BxV: jax.Array, keys_B: jax.Array, params: SamplingParams, *, greedy: bool,
           truncate: bool) -> jax.Array:
    """The next token per row [B] (int32). `keys_B` holds one PRNG key per row, so a row's draws
    do not depend on which other rows share its batch."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / params.temperature
    if truncate:
        logits_BxV = truncate_logits(logits_BxV, params.top_k, params.top_p)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


def token_logprobs(logits_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """log p(token) under the raw distribution (temperature 1, no truncation), float32 [B]."""
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]
