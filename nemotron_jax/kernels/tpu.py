"""TPU path: JAX's splash attention behind the same interface.

Never run on a real TPU here; the tests run `splash_causal` in TPU interpret mode on CPU.

Splash masks by token *index* (causal) and segment, while our contract masks by *position*. The two
agree exactly when q and kv are the same tokens (T == S, q_pos == kv_pos, q_seg == kv_seg), segment
ids never decrease along a row (each segment is one contiguous run) and positions strictly increase
within a segment: then kv_pos[j] <= q_pos[i] iff j <= i inside a segment. That is checked on device
and `lax.cond` picks splash or the XLA reference, so the answer is exact either way; shapes splash
cannot take (T != S, T or head_dim not multiples of 128) use the reference, with a logged reason.
The other `cond` branch is the reference applied to 512-query chunks under `jax.checkpoint`, so
compiling it never allocates a full [T, S] logits buffer for a branch that usually does not run.

Splash does not scale logits, so q is scaled by head_dim**-0.5 first (one extra rounding in bf16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.kernels._common import warn_once


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq: int, heads: int, interpret: bool) -> Any:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((seq, seq))] * heads)
    return sa.make_splash_mha_single_device(mask, block_sizes=sa.BlockSizes.get_default(), interpret=interpret)


def splash_causal(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, seg_BxT: jax.Array | None,
                  *, interpret: bool = False) -> jax.Array:
    """Index-causal (+ segment) GQA through splash; `interpret=True` runs it on CPU (tests)."""
    _, t, n, h = q_BxTxNxH.shape
    kernel = _splash_kernel(t, n, interpret)
    q_BxNxTxH = jnp.swapaxes(q_BxTxNxH * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype), 1, 2)
    k_BxKxTxH, v_BxKxTxH = jnp.swapaxes(k_BxTxKxH, 1, 2), jnp.swapaxes(v_BxTxKxH, 1, 2)
    if seg_BxT is None:
        out = jax.vmap(lambda a, b, c: kernel(a, b, c))(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH)
    else:
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=SegmentIds(q=s, kv=s)))(
            q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, seg_BxT)
    return jnp.swapaxes(out, 1, 2).astype(q_BxTxNxH.dtype)


def index_causal(q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array, q_seg_BxT: jax.Array | None,
                 kv_seg_BxS: jax.Array | None) -> jax.Array:
    """Scalar bool: does index-causal + segment masking equal the position rule for these inputs?"""
    ok = jnp.all(q_pos_BxT == kv_pos_BxS)
    step_up = q_pos_BxT[:, 1:] > q_pos_BxT[:, :-1]
    if q_seg_BxT is None:
        return ok & jnp.all(step_up)
    same = q_seg_BxT[:, 1:] == q_seg_BxT[:, :-1]
    ok &= jnp.all(q_seg_BxT == kv_seg_BxS) & jnp.all(q_seg_BxT[:, 1:] >= q_seg_BxT[:, :-1])
    return ok & jnp.all(step_up | ~same)


def splash_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, q_pos_BxT: jax.Array,
                     kv_pos_BxS: jax.Array, q_seg_BxT: jax.Array | None, kv_seg_BxS: jax.Array | None,
                     reference: Callable[..., jax.Array]) -> jax.Array:
    """Splash attention where it provably matches the reference, else the reference."""
    _, t, n, h = q_BxTxNxH.shape
    args = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, kv_pos_BxS, q_seg_BxT, kv_seg_BxS)
    if t != k_BxSxKxH.shape[1] or t % 128 or h % 128:
        warn_once(f"splash attention needs T == S and T, head_dim multiples of 128 (T={t}, "
                  f"S={k_BxSxKxH.shape[1]}, head_dim={h})")
        return reference(*args)
    try:
        _splash_kernel(t, n, False)
    except ImportError as e:  # pragma: no cover - depends on the jaxlib build
        warn_once(f"splash attention unavailable ({e})")
        return reference(*args)
    return jax.lax.cond(index_causal(q_pos_BxT, kv_pos_BxS, q_seg_BxT, kv_seg_BxS),
                        lambda: splash_causal(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_seg_BxT),
                        lambda: chunked_reference(reference, *args))


def chunked_reference(reference: Callable[..., jax.Array], q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array,
                      v_BxSxKxH: jax.Array, q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array,
                      q_seg_BxT: jax.Array | None, kv_seg_BxS: jax.Array | None, chunk: int = 512) -> jax.Array:
    """The reference over query chunks (rows are independent), rematerialised in the backward pass."""
    b, t, n, h = q_BxTxNxH.shape
    if t <= chunk or t % chunk:
        return reference(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, kv_pos_BxS, q_seg_BxT, kv_seg_BxS)
    split = lambda x: jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)
    segs = None if q_seg_BxT is None else split(q_seg_BxT)

    @jax.checkpoint
    def one(xs):
        q, pos, seg = xs
        return reference(q, k_BxSxKxH, v_BxSxKxH, pos, kv_pos_BxS, seg, kv_seg_BxS)

    out_CxBxLxNxH = jax.lax.map(one, (split(q_BxTxNxH), split(q_pos_BxT), segs))
    return jnp.swapaxes(out_CxBxLxNxH, 0, 1).reshape(b, t, n, h)
