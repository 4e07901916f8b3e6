"""The plain-XLA references: what the model runs by default and what every kernel must match.

They live here, beside the Pallas kernels, so that kernels/ is a leaf: the kernels and their
fallbacks need nothing from model/, and model/ imports these (downward) as its default functions.

Masking is by positions, not by token index: a query at position p sees keys at positions <= p in
the same segment. That one rule covers training, packed sequences (segment ids, positions restart
per segment) and decoding against a cache whose slot j holds position j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.sharding import constrain


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array,
                          q_seg_BxT: jax.Array | None = None,
                          kv_seg_BxS: jax.Array | None = None) -> jax.Array:
    """Causal GQA softmax attention in plain XLA (the reference every kernel is checked against).

    Query head n uses KV head n // (N // K), as HF's `repeat_kv` does. Softmax in float32. A query
    that may see nothing (a padding row) gets zeros rather than NaN.
    """
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)
    logits_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                                  preferred_element_type=jnp.float32) * (h ** -0.5)
    mask_BxTxS = kv_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]
    if q_seg_BxT is not None:
        mask_BxTxS &= q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :]
    mask = mask_BxTxS[:, None, None]
    logits_BxKxGxTxS = jnp.where(mask, logits_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


def swiglu(h_BxTxD: jax.Array, gate_DxF: jax.Array, up_DxF: jax.Array, down_FxD: jax.Array) -> jax.Array:
    """down(silu(gate(h)) * up(h)) in plain XLA: the reference for the fused kernel."""
    act_BxTxF = jax.nn.silu(h_BxTxD @ gate_DxF) * (h_BxTxD @ up_DxF)
    return constrain(act_BxTxF, ("batch", "seq", "act_mlp")) @ down_FxD
