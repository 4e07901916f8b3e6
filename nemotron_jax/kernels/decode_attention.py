"""Decode attention: a few new queries per row against a KV cache, split-K over the cache.

Decoding is memory bound: each step reads the whole cache once. So one program handles one
(split, row, KV head) and processes *all* G query heads of that KV head (times the T new tokens)
as the rows of one tile: every K/V block is loaded once for the group, not G times. The cache
axis is cut into `num_splits` chunks that run in parallel (small batches still fill the GPU); each
writes an unnormalised partial (acc, running max, running sum) and XLA combines them.

Ragged rows need nothing special: row b only loops over the cache blocks that may hold keys at
positions <= its largest query position (block min of `kv_pos`), so a row at position 10 of a
32k cache reads one block. Masking is the reference's, per element: kv_pos <= q_pos.

Forward only as a kernel; the VJP (rarely wanted while decoding) is the XLA reference's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nemotron_jax.kernels import _common as c
from nemotron_jax.kernels.reference import dot_product_attention


def decode_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                     q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array, *, block_k: int = 128,
                     num_splits: int | None = None, interpret: bool | None = None) -> jax.Array:
    """Attention of T (small) queries per row against S cache slots; same contract as the reference."""
    s = k_BxSxKxH.shape[1]
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    bk = _divisor_block(s, block_k)
    n_blocks = -(-s // bk)
    splits = num_splits or _default_splits(k_BxSxKxH.shape[0] * k_BxSxKxH.shape[2], n_blocks)
    interpret = c.interpret_mode() if interpret is None else interpret
    return _decode(bk, max(1, min(splits, n_blocks)), interpret, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                   q_pos_BxT.astype(jnp.int32), kv_pos_BxS.astype(jnp.int32))


def _divisor_block(s: int, block_k: int) -> int:
    """The largest power-of-two block <= block_k dividing S (no cache copy); else block_k (padding)."""
    b = max(16, min(block_k, c.next_pow2(s)))
    while b > 16 and s % b:
        b //= 2
    return b


def _default_splits(programs: int, n_blocks: int, target: int = 264) -> int:
    """Enough splits for ~2 programs per SM of a 132-SM GPU, each at least 4 blocks long."""
    return max(1, min(-(-target // programs), n_blocks // 4))


def _reference(q, k, v, q_pos, kv_pos):
    return dot_product_attention(q, k, v, q_pos, kv_pos)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _decode(block_k: int, splits: int, interpret: bool, q, k, v, q_pos, kv_pos) -> jax.Array:
    return _decode_fwd(block_k, splits, interpret, q, k, v, q_pos, kv_pos)[0]


def _decode_fwd(block_k, splits, interpret, q, k, v, q_pos, kv_pos):
    return decode_forward(block_k, splits, interpret, q, k, v, q_pos, kv_pos), (q, k, v, q_pos, kv_pos)


def _decode_bwd(block_k, splits, interpret, res, dout):
    q, k, v, q_pos, kv_pos = res
    _, vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, q_pos, kv_pos), q, k, v)
    return (*vjp(dout), None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_forward(block_k: int, splits: int, interpret: bool, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                   q_pos_BxT, kv_pos_BxS) -> jax.Array:
    b, t, n, h = q_BxTxNxH.shape
    s, kh = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    g = n // kh
    rows, hp = max(16, c.next_pow2(t * g)), c.next_pow2(h)
    sp = c.round_up(s, block_k)
    # Rows of one KV head's tile: r = t * G + g, padded with never-visible rows.
    q_BxKxRxH = q_BxTxNxH.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)
    q_BxKxRxH = c.pad_axis(c.pad_axis(q_BxKxRxH, 2, rows), 3, hp)
    q_pos_BxR = c.pad_axis(jnp.repeat(q_pos_BxT, g, axis=1), 1, rows, c.INT_MIN)
    k_pad = c.pad_axis(c.pad_axis(k_BxSxKxH, 1, sp), 3, hp)
    v_pad = c.pad_axis(c.pad_axis(v_BxSxKxH, 1, sp), 3, hp)
    kv_pos_pad = c.pad_axis(kv_pos_BxS, 1, sp, c.INT_MAX)
    vis_Bx1xK = c.visible_blocks(jnp.max(q_pos_BxT, axis=1, keepdims=True), kv_pos_pad, None, None, 1, block_k)
    lo_B, hi_B = (x[:, 0] for x in c.span(vis_Bx1xK))
    per_split = -(-(sp // block_k) // splits)

    kernel = functools.partial(_decode_kernel, scale=h ** -0.5, block_k=block_k, per_split=per_split, kv_len=s)
    tile = lambda *lead: pl.BlockSpec((None, None, None, *lead), lambda si, bi, hi: (bi, hi, si, 0, 0)[:3 + len(lead)])
    acc, m, lsum = pl.pallas_call(
        kernel,
        grid=(splits, b, kh),
        in_specs=[pl.BlockSpec((None, None, rows, hp), lambda si, bi, hi: (bi, hi, 0, 0)),
                  pl.BlockSpec((None, sp, None, hp), lambda si, bi, hi: (bi, 0, hi, 0)),
                  pl.BlockSpec((None, sp, None, hp), lambda si, bi, hi: (bi, 0, hi, 0)),
                  pl.BlockSpec((None, rows), lambda si, bi, hi: (bi, 0)),
                  pl.BlockSpec((None, sp), lambda si, bi, hi: (bi, 0)),
                  pl.BlockSpec((None,), lambda si, bi, hi: (bi,)),
                  pl.BlockSpec((None,), lambda si, bi, hi: (bi,))],
        out_specs=[tile(rows, hp), tile(rows), tile(rows)],
        out_shape=[jax.ShapeDtypeStruct((b, kh, splits, rows, hp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32)],
        compiler_params=c.triton_params(4, 2, interpret),
        interpret=interpret,
        name="decode_attention",
    )(q_BxKxRxH, k_pad, v_pad, q_pos_BxR, kv_pos_pad, lo_B, hi_B)
    out_BxKxRxH = _combine(acc, m, lsum)[:, :, :t * g, :h].astype(q_BxTxNxH.dtype)
    return out_BxKxRxH.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def _combine(acc_BxKxPxRxH: jax.Array, m_BxKxPxR: jax.Array, l_BxKxPxR: jax.Array) -> jax.Array:
    """Merge the split partials: rescale each to the global max, then normalise (0 where nothing seen)."""
    m_all = jnp.max(m_BxKxPxR, axis=2, keepdims=True)
    w = jnp.exp(m_BxKxPxR - m_all)
    l_all = jnp.sum(w * l_BxKxPxR, axis=2)
    acc = jnp.sum(w[..., None] * acc_BxKxPxRxH, axis=2)
    return acc / jnp.where(l_all > 0, l_all, 1.0)[..., None]


def _decode_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, lo_ref, hi_ref, acc_ref, m_ref, l_ref, *,
                   scale: float, block_k: int, per_split: int, kv_len: int) -> None:
    q, q_pos = q_ref[...], qp_ref[...]
    first = pl.program_id(0) * per_split
    lo = jnp.maximum(lo_ref[()], first)
    hi = jnp.minimum(hi_ref[()], first + per_split)

    def body(j, carry):
        acc, m, lsum = carry
        start = j * block_k
        kv = pl.ds(pl.multiple_of(start, block_k), block_k)
        k, v = k_ref[kv, :], v_ref[kv, :]
        real = (start + jnp.arange(block_k, dtype=jnp.int32)) < kv_len
        mask = (kp_ref[kv][None, :] <= q_pos[:, None]) & real[None, :]
        s = jnp.where(mask, c.dot(q, k, (1, 1)) * scale, c.NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        return alpha[:, None] * acc + c.dot(p.astype(v.dtype), v), m_new, alpha * lsum + jnp.sum(p, axis=1)

    r, hp = q.shape
    init = (jnp.zeros((r, hp), jnp.float32), jnp.full((r,), c.NEG, jnp.float32), jnp.zeros((r,), jnp.float32))
    acc, m, lsum = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), body, init)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, lsum
