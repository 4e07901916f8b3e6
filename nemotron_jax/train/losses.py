"""Token losses computed over the vocabulary in chunks of tokens.

Logits for N tokens over a 128k vocabulary would be N×V floats (64k tokens × 128k × 4 B = 32 GiB).
Every loss here instead maps over chunks of K tokens: project K hidden states to logits, reduce
them to one number per token, drop the logits. The chunk body is rematerialised, so the backward
pass also holds one chunk's logits at a time. Each function returns a per-token vector [N];
callers weight and sum it (weights are the loss mask).

Legend: N tokens, K tokens per chunk, C chunks, D hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from nemotron_jax.model.transformer import Transformer
from nemotron_jax.sharding import constrain


def lm_head(module: Transformer) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    return module.embed[...].T if module.lm_head is None else module.lm_head[...]


def logits_chunk(h_KxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
    """Float32 logits for one chunk, exactly as `Transformer.project` computes them."""
    logits_KxV = jnp.einsum("kd,dv->kv", h_KxD, head_DxV.astype(h_KxD.dtype), preferred_element_type=jnp.float32)
    return constrain(logits_KxV, (None, "act_vocab"))


def chunked_map(fn: Callable[..., tuple[jax.Array, ...]], chunk: int, *per_token: jax.Array
                ) -> tuple[jax.Array, ...]:
    """Apply `fn` (chunk arrays -> per-token outputs [K]) over chunks of the leading token axis.

    Pads N up to a multiple of `chunk`, runs `fn` under `jax.checkpoint` in a `lax.map`, and
    returns outputs trimmed back to [N].
    """
    n = per_token[0].shape[0]
    chunk = max(1, min(chunk, n))
    c = -(-n // chunk)
    pad = c * chunk - n

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(c, chunk, *x.shape[1:])

    outs = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(split(x) for x in per_token))
    return tuple(o.reshape(c * chunk)[:n] for o in outs)


def cross_entropy_per_token(h_NxD: jax.Array, head_DxV: jax.Array, targets_N: jax.Array,
                            chunk: int = 4096) -> jax.Array:
    """-log softmax(h @ head)[target] per token [N], float32."""
    def fn(h_KxD, targets_K):
        logits_KxV = logits_chunk(h_KxD, head_DxV)
        picked_K = jnp.take_along_axis(logits_KxV, targets_K[:, None], axis=-1)[:, 0]
        return (jax.nn.logsumexp(logits_KxV, axis=-1) - picked_K,)

    return chunked_map(fn, chunk, h_NxD, targets_N)[0]


def kd_per_token(h_NxD: jax.Array, head_DxV: jax.Array, teacher_h_NxD: jax.Array, teacher_head_DxV: jax.Array,
                 targets_N: jax.Array, temperature: float = 1.0, top_k: int | None = None,
                 chunk: int = 4096) -> tuple[jax.Array, jax.Array]:
    """(forward KL(teacher‖student) at `temperature`, student cross-entropy), each per token [N].

    KL = τ² Σ_v p_T(v) (log p_T(v) − log p_S(v)) with both distributions softened by τ; the τ²
    keeps gradient magnitudes comparable across temperatures (Hinton et al.). With `top_k`, the
    teacher keeps only its k most likely tokens, renormalised, and the sum runs over those (the
    student's log-probabilities stay normalised over the full vocabulary). The teacher side
    carries no gradient. The cross-entropy is at temperature 1, for the optional LM term.
    """
    tau = float(temperature)

    def fn(h_KxD, teacher_h_KxD, targets_K):
        logits_KxV = logits_chunk(h_KxD, head_DxV)
        teacher_KxV = jax.lax.stop_gradient(logits_chunk(teacher_h_KxD, teacher_head_DxV))
        log_ps_KxV = jax.nn.log_softmax(logits_KxV / tau, axis=-1)
        if top_k is None:
            log_pt_KxV = jax.nn.log_softmax(teacher_KxV / tau, axis=-1)
            kl_K = jnp.sum(jnp.exp(log_pt_KxV) * (log_pt_KxV - log_ps_KxV), axis=-1)
        else:
            top_KxJ, idx_KxJ = jax.lax.top_k(teacher_KxV / tau, top_k)
            log_pt_KxJ = jax.nn.log_softmax(top_KxJ, axis=-1)
            log_ps_KxJ = jnp.take_along_axis(log_ps_KxV, idx_KxJ, axis=-1)
            kl_K = jnp.sum(jnp.exp(log_pt_KxJ) * (log_pt_KxJ - log_ps_KxJ), axis=-1)
        picked_K = jnp.take_along_axis(logits_KxV, targets_K[:, None], axis=-1)[:, 0]
        ce_K = jax.nn.logsumexp(logits_KxV, axis=-1) - picked_K
        return kl_K * tau**2, ce_K

    return chunked_map(fn, chunk, h_NxD, teacher_h_NxD, targets_N)


def cosine_per_token(h_NxD: jax.Array, teacher_h_NxD: jax.Array, eps: float = 1e-8) -> jax.Array:
    """1 − cos(h, h_teacher) per token [N] (float32); the teacher side carries no gradient."""
    a = h_NxD.astype(jnp.float32)
    b = jax.lax.stop_gradient(teacher_h_NxD).astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)
    return 1.0 - cos
