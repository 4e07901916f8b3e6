"""Attention subblocks: grouped-query attention and the linear replacement.

Masking is by positions, not by token index: a query at position p sees keys at positions <= p in
the same segment. That one rule covers training, packed sequences (segment ids, positions restart
per segment) and decoding against a cache whose slot j holds position j. The plain-XLA
`dot_product_attention` that implements it (the default `attention_fn`) lives in
`kernels/reference.py`, beside the kernels it is the reference for.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.kernels.reference import dot_product_attention
from nemotron_jax.model.layers import RMSNorm, param, rope
from nemotron_jax.model.lora import with_adapter
from nemotron_jax.sharding import constrain


class KVCache(NamedTuple):
    """One GQA layer's cache; slot j holds the key/value of position j."""

    k_BxSxKxH: jax.Array
    v_BxSxKxH: jax.Array


def write_cache(cache: KVCache, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                positions_BxT: jax.Array) -> KVCache:
    """Write new keys/values into the slots named by their positions (rows may be at different ones)."""
    rows_Bx1 = jnp.arange(k_BxTxKxH.shape[0])[:, None]
    return KVCache(cache.k_BxSxKxH.at[rows_Bx1, positions_BxT].set(k_BxTxKxH.astype(cache.k_BxSxKxH.dtype)),
                   cache.v_BxSxKxH.at[rows_Bx1, positions_BxT].set(v_BxTxKxH.astype(cache.v_BxSxKxH.dtype)))


class GQAttention(nnx.Module):
    """RMSNorm -> q/k/v projections -> RoPE -> causal GQA -> o projection."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 inv_freq: np.ndarray, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static: hashable for the graphdef
        self.norm = RMSNorm(hidden, eps, param_dtype=param_dtype)
        self.q = param(rngs, (hidden, heads, head_dim), ("embed", "heads", "head_dim"), param_dtype)
        self.k = param(rngs, (hidden, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v = param(rngs, (hidden, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o = param(rngs, (heads, head_dim, hidden), ("heads", "head_dim", "embed"), param_dtype,
                       fan_in=heads * head_dim)
        self.lora: nnx.Dict | None = nnx.data(None)  # adapters by projection (nemotron_jax.lora)

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array | None,
                 cache: KVCache | None, attention_fn=dot_product_attention) -> tuple[jax.Array, KVCache | None]:
        dtype = x_BxTxD.dtype
        h_BxTxD = self.norm(x_BxTxD)
        q = with_adapter(jnp.einsum("btd,dnh->btnh", h_BxTxD, self.q[...].astype(dtype)), h_BxTxD, self.lora, "q")
        k = with_adapter(jnp.einsum("btd,dkh->btkh", h_BxTxD, self.k[...].astype(dtype)), h_BxTxD, self.lora, "k")
        v = with_adapter(jnp.einsum("btd,dkh->btkh", h_BxTxD, self.v[...].astype(dtype)), h_BxTxD, self.lora, "v")
        q = constrain(rope(q, positions_BxT, self.inv_freq), ("batch", "seq", "act_heads", None))
        k = constrain(rope(k, positions_BxT, self.inv_freq), ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        if cache is None:
            out = attention_fn(q, k, v, positions_BxT, positions_BxT, segment_ids_BxT, segment_ids_BxT)
        else:
            cache = write_cache(cache, k, v, positions_BxT)
            slots_BxS = jnp.broadcast_to(jnp.arange(cache.k_BxSxKxH.shape[1]), cache.k_BxSxKxH.shape[:2])
            out = attention_fn(q, cache.k_BxSxKxH.astype(dtype), cache.v_BxSxKxH.astype(dtype),
                               positions_BxT, slots_BxS)
        out_BxTxD = with_adapter(jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(dtype)), out, self.lora, "o",
                                 in_axes=2)
        return out_BxTxD, cache


class LinearAttention(nnx.Module):
    """Puzzle's attention replacement: one [hidden, hidden] map of the normed input, no token mixing."""

    def __init__(self, hidden: int, eps: float, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(hidden, eps, param_dtype=param_dtype)
        self.kernel = param(rngs, (hidden, hidden), ("embed", "mlp"), param_dtype)
        self.lora: nnx.Dict | None = nnx.data(None)

    def __call__(self, x_BxTxD: jax.Array, *unused, **unused_kw) -> tuple[jax.Array, None]:
        h_BxTxD = self.norm(x_BxTxD)
        return with_adapter(h_BxTxD @ self.kernel[...].astype(x_BxTxD.dtype), h_BxTxD, self.lora, "kernel"), None
