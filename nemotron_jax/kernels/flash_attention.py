"""Flash attention (training path): causal-by-position GQA with segments, Pallas fwd + bwd.

Same contract as `reference.dot_product_attention`: query head n uses KV head n // (N // K);
a query at position p sees keys at positions <= p in its segment; rows that see nothing give 0.

Forward: grid (q block, batch, query head); each program streams the KV blocks of its KV head with
an online softmax in float32 and writes the output and the row logsumexp. Which KV blocks a q block
loops over comes from `visible_blocks` (computed once per call in XLA from block min/max of the
positions and segments), so causal and packed-document sparsity is skipped without assuming
positions are token indices; the exact mask is still applied per element.

Backward (`flash_backward.py`): probabilities are recomputed from the saved logsumexp; one kernel
for dQ (per q block) and one for dK/dV (per KV block, looping over the G query heads that share the
KV head, so no atomics and no [.., N, ..]-sized dK partials). What both passes share (config,
padded operands, mask, block bounds) is in `flash_common.py`.

Lengths that are not block multiples are padded inside the wrapper: padded keys get position
INT_MAX and are also excluded by index, padded query rows are sliced off. A head dim that is not a
power of two is zero-padded (Triton tiles must be powers of two); the scale uses the true dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nemotron_jax.kernels import _common as c
from nemotron_jax.kernels.flash_backward import backward
from nemotron_jax.kernels.flash_common import FlashConfig, Prepared, block_bounds, key_mask, num_warps


def flash_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                    q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array, q_seg_BxT: jax.Array | None = None,
                    kv_seg_BxS: jax.Array | None = None, *, block_q: int = 128, block_k: int = 64,
                    block_outer_bwd: int = 64, block_inner_bwd: int = 32,
                    interpret: bool | None = None) -> jax.Array:
    """Differentiable flash attention with the reference's exact masking (see module docstring)."""
    t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    check_shapes(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, kv_pos_BxS, q_seg_BxT, kv_seg_BxS)
    for name, b in (("block_q", block_q), ("block_k", block_k), ("block_outer_bwd", block_outer_bwd),
                    ("block_inner_bwd", block_inner_bwd)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    fit = lambda b, n: max(16, min(b, c.next_pow2(n)))  # no block longer than the padded sequence
    cfg = FlashConfig(fit(block_q, t), fit(block_k, s), fit(block_outer_bwd, min(t, s)),
                      fit(block_inner_bwd, min(t, s)), s,
                      c.interpret_mode() if interpret is None else interpret)
    return _flash(cfg, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT.astype(jnp.int32),
                  kv_pos_BxS.astype(jnp.int32), _as_int(q_seg_BxT), _as_int(kv_seg_BxS))


def check_shapes(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> None:
    """Clear errors for inconsistent operands (mirrors what the reference would silently assume)."""
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k/v must be [B, S, K, {h}] with B={b}; got k {k.shape}, v {v.shape}")
    if n % k.shape[2]:
        raise ValueError(f"query heads ({n}) must be a multiple of KV heads ({k.shape[2]})")
    if q_pos.shape != (b, t) or kv_pos.shape != (b, k.shape[1]):
        raise ValueError(f"positions must be [B, T] and [B, S]; got {q_pos.shape}, {kv_pos.shape}")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q_seg and kv_seg or neither")
    if q_seg is not None and (q_seg.shape != q_pos.shape or kv_seg.shape != kv_pos.shape):
        raise ValueError(f"segment ids must match positions; got {q_seg.shape}, {kv_seg.shape}")


def _as_int(x: jax.Array | None) -> jax.Array | None:
    return None if x is None else x.astype(jnp.int32)


def prepare(cfg: FlashConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> Prepared:
    """Pad T, S to block multiples and H to a power of two, with masked-out padding."""
    bwd = max(cfg.block_outer_bwd, cfg.block_inner_bwd)
    tp = c.round_up(q.shape[1], max(cfg.block_q, bwd))
    sp = c.round_up(k.shape[1], max(cfg.block_k, bwd))
    hp = c.next_pow2(q.shape[3])
    pad_qkv = lambda x, n: c.pad_axis(c.pad_axis(x, 1, n), 3, hp)
    return Prepared(
        pad_qkv(q, tp), pad_qkv(k, sp), pad_qkv(v, sp),
        c.pad_axis(q_pos, 1, tp, c.INT_MIN), c.pad_axis(kv_pos, 1, sp, c.INT_MAX),
        None if q_seg is None else c.pad_axis(q_seg, 1, tp, -1),
        None if kv_seg is None else c.pad_axis(kv_seg, 1, sp, -2))


def _fwd_kernel(*refs, scale: float, block_k: int, kv_len: int, has_seg: bool) -> None:
    if has_seg:
        q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
        q_seg = qs_ref[...]
    else:
        q_ref, k_ref, v_ref, qp_ref, kp_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
        q_seg, ks_ref = None, None
    q, q_pos = q_ref[...], qp_ref[...]
    bq, hp = q.shape

    def body(j, carry):
        acc, m, lsum = carry
        start = j * block_k
        kv = pl.ds(pl.multiple_of(start, block_k), block_k)
        k, v = k_ref[kv, :], v_ref[kv, :]
        mask = key_mask(q_pos, kp_ref[kv], q_seg, None if ks_ref is None else ks_ref[kv], start, block_k, kv_len)
        s = jnp.where(mask, c.dot(q, k, (1, 1)) * scale, c.NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        lsum = alpha * lsum + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + c.dot(p.astype(v.dtype), v)
        return acc, m_new, lsum

    init = (jnp.zeros((bq, hp), jnp.float32), jnp.full((bq,), c.NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, lsum = jax.lax.fori_loop(lo_ref[()], hi_ref[()], body, init)
    seen = lsum > 0.0
    l_safe = jnp.where(seen, lsum, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), c.BIG_LSE)


def forward_call(cfg: FlashConfig, p: Prepared, q_lo: jax.Array, q_hi: jax.Array,
                 scale: float) -> tuple[jax.Array, jax.Array]:
    """The forward pallas_call: padded output [B, Tp, N, Hp] and logsumexp [B, N, Tp] (float32)."""
    b, tp, n, hp = p.q.shape
    sp, kh = p.k.shape[1], p.k.shape[2]
    g, bq = n // kh, cfg.block_q
    has_seg = p.q_seg is not None
    q_spec = pl.BlockSpec((None, bq, None, hp), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((None, sp, None, hp), lambda i, bi, ni: (bi, 0, ni // g, 0))
    qrow_spec = pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i))
    kvrow_spec = pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0))
    scalar_spec = pl.BlockSpec((None, None), lambda i, bi, ni: (bi, i))
    seg_specs, segs = ([qrow_spec, kvrow_spec], [p.q_seg, p.kv_seg]) if has_seg else ([], [])
    kernel = functools.partial(_fwd_kernel, scale=scale, block_k=cfg.block_k, kv_len=cfg.kv_len, has_seg=has_seg)
    out, lse = pl.pallas_call(
        kernel,
        grid=(tp // bq, b, n),
        in_specs=[q_spec, kv_spec, kv_spec, qrow_spec, kvrow_spec, *seg_specs, scalar_spec, scalar_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        compiler_params=c.triton_params(num_warps(hp), cfg.num_stages, cfg.interpret),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(p.q, p.k, p.v, p.q_pos, p.kv_pos, *segs, q_lo, q_hi)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: FlashConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> jax.Array:
    return _flash_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]


def _flash_fwd(cfg: FlashConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    t, h = q.shape[1], q.shape[3]
    p = prepare(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    q_lo, q_hi, _, _ = block_bounds(p, cfg.block_q, cfg.block_k)
    out_pad, lse = forward_call(cfg, p, q_lo, q_hi, h ** -0.5)
    return out_pad[:, :t, :, :h], (p, out_pad, lse)


def _flash_bwd(cfg: FlashConfig, res, dout_BxTxNxH):
    p, out_pad, lse = res
    return (*backward(cfg, p, out_pad, lse, dout_BxTxNxH), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
