"""Flash attention backward: dQ and dK/dV as two Pallas kernels, probabilities recomputed.

With P = exp(S - lse) masked (lse saved by the forward), delta = rowsum(dO * O) (an XLA reduction,
elementwise and cheap), dP = dO V^T and dS = P * (dP - delta):

    dV = P^T dO,   dK = scale * dS^T Q,   dQ = scale * dS K.

dQ is one program per (q block, batch, query head) looping over the KV blocks that q block may see;
dK/dV is one program per (KV block, batch, KV head) looping over the G query heads of that KV head
and the q blocks that may see the KV block, so the group sum happens in registers. Splitting dQ
from dK/dV recomputes S once more but needs no atomics (FlashAttention-2's choice on GPUs too).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nemotron_jax.kernels import _common as c
from nemotron_jax.kernels.flash_common import FlashConfig, Prepared, block_bounds, key_mask, num_warps


def backward(cfg: FlashConfig, p: Prepared, out_pad: jax.Array, lse_BxNxTp: jax.Array,
             dout_BxTxNxH: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) shaped and typed like q, k, v (unpadded)."""
    t, h = dout_BxTxNxH.shape[1], dout_BxTxNxH.shape[3]
    tp, hp = p.q.shape[1], p.q.shape[3]
    do_pad = c.pad_axis(c.pad_axis(dout_BxTxNxH.astype(p.q.dtype), 1, tp), 3, hp)
    delta_BxTpxN = jnp.sum(out_pad.astype(jnp.float32) * do_pad.astype(jnp.float32), axis=-1)
    delta_BxNxTp = jnp.swapaxes(delta_BxTpxN, 1, 2)
    outer, inner = cfg.block_outer_bwd, cfg.block_inner_bwd
    q_lo, q_hi, _, _ = block_bounds(p, outer, inner)  # dQ: q blocks of `outer`, kv steps of `inner`
    _, _, k_lo, k_hi = block_bounds(p, inner, outer)  # dK/dV: kv blocks of `outer`, q steps of `inner`
    scale = h ** -0.5
    dq = _dq_call(cfg, p, do_pad, lse_BxNxTp, delta_BxNxTp, q_lo, q_hi, scale)
    dk, dv = _dkdv_call(cfg, p, do_pad, lse_BxNxTp, delta_BxNxTp, k_lo, k_hi, scale)
    s = cfg.kv_len
    return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h]


def _dq_kernel(*refs, scale: float, block_k: int, kv_len: int, has_seg: bool) -> None:
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref, qs_ref, ks_ref,
         lo_ref, hi_ref, dq_ref) = refs
        q_seg = qs_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref, lo_ref, hi_ref, dq_ref = refs
        q_seg, ks_ref = None, None
    q, do, q_pos = q_ref[...], do_ref[...], qp_ref[...]
    lse, delta = lse_ref[...], dl_ref[...]

    def body(j, dq):
        start = j * block_k
        kv = pl.ds(pl.multiple_of(start, block_k), block_k)
        k, v = k_ref[kv, :], v_ref[kv, :]
        mask = key_mask(q_pos, kp_ref[kv], q_seg, None if ks_ref is None else ks_ref[kv], start, block_k, kv_len)
        prob = jnp.where(mask, jnp.exp(c.dot(q, k, (1, 1)) * scale - lse[:, None]), 0.0)
        ds = prob * (c.dot(do, v, (1, 1)) - delta[:, None])
        return dq + c.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(lo_ref[()], hi_ref[()], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dq_call(cfg: FlashConfig, p: Prepared, do_pad, lse, delta, q_lo, q_hi, scale: float) -> jax.Array:
    b, tp, n, hp = p.q.shape
    sp, kh = p.k.shape[1], p.k.shape[2]
    g, bq = n // kh, cfg.block_outer_bwd
    has_seg = p.q_seg is not None
    q_spec = pl.BlockSpec((None, bq, None, hp), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((None, sp, None, hp), lambda i, bi, ni: (bi, 0, ni // g, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
    qrow_spec = pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i))
    kvrow_spec = pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0))
    scalar_spec = pl.BlockSpec((None, None), lambda i, bi, ni: (bi, i))
    seg_specs, segs = ([qrow_spec, kvrow_spec], [p.q_seg, p.kv_seg]) if has_seg else ([], [])
    kernel = functools.partial(_dq_kernel, scale=scale, block_k=cfg.block_inner_bwd, kv_len=cfg.kv_len,
                               has_seg=has_seg)
    return pl.pallas_call(
        kernel,
        grid=(tp // bq, b, n),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qrow_spec, kvrow_spec, *seg_specs,
                  scalar_spec, scalar_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(p.q.shape, p.q.dtype),
        compiler_params=c.triton_params(num_warps(hp), cfg.num_stages, cfg.interpret),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(p.q, p.k, p.v, do_pad, lse, delta, p.q_pos, p.kv_pos, *segs, q_lo, q_hi)


def _dkdv_kernel(*refs, scale: float, block_q: int, block_k: int, groups: int, kv_len: int,
                 has_seg: bool) -> None:
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref, qs_ref, ks_ref,
         lo_ref, hi_ref, dk_ref, dv_ref) = refs
        kv_seg = ks_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref, lo_ref, hi_ref, dk_ref, dv_ref = refs
        kv_seg, qs_ref = None, None
    k, v, kv_pos = k_ref[...], v_ref[...], kp_ref[...]
    start_k = pl.program_id(0) * block_k
    lo, hi = lo_ref[()], hi_ref[()]

    def head(gi, carry):
        def body(i, carry):
            dk, dv = carry
            rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            q, do = q_ref[rows, gi, :], do_ref[rows, gi, :]
            lse, delta = lse_ref[gi, rows], dl_ref[gi, rows]
            mask = key_mask(qp_ref[rows], kv_pos, None if qs_ref is None else qs_ref[rows], kv_seg,
                            start_k, block_k, kv_len)
            prob = jnp.where(mask, jnp.exp(c.dot(q, k, (1, 1)) * scale - lse[:, None]), 0.0)
            dv = dv + c.dot(prob.astype(do.dtype), do, (0, 0))
            ds = prob * (c.dot(do, v, (1, 1)) - delta[:, None])
            dk = dk + c.dot(ds.astype(q.dtype), q, (0, 0))
            return dk, dv

        return jax.lax.fori_loop(lo, hi, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_call(cfg: FlashConfig, p: Prepared, do_pad, lse, delta, k_lo, k_hi,
               scale: float) -> tuple[jax.Array, jax.Array]:
    b, tp, n, hp = p.q.shape
    sp, kh = p.k.shape[1], p.k.shape[2]
    g, bk = n // kh, cfg.block_outer_bwd
    has_seg = p.q_seg is not None
    kv_spec = pl.BlockSpec((None, bk, None, hp), lambda j, bi, hi: (bi, j, hi, 0))
    q_spec = pl.BlockSpec((None, tp, g, hp), lambda j, bi, hi: (bi, 0, hi, 0))
    row_spec = pl.BlockSpec((None, g, tp), lambda j, bi, hi: (bi, hi, 0))
    qrow_spec = pl.BlockSpec((None, tp), lambda j, bi, hi: (bi, 0))
    kvrow_spec = pl.BlockSpec((None, bk), lambda j, bi, hi: (bi, j))
    scalar_spec = pl.BlockSpec((None, None), lambda j, bi, hi: (bi, j))
    seg_specs, segs = ([qrow_spec, kvrow_spec], [p.q_seg, p.kv_seg]) if has_seg else ([], [])
    kernel = functools.partial(_dkdv_kernel, scale=scale, block_q=cfg.block_inner_bwd, block_k=bk, groups=g,
                               kv_len=cfg.kv_len, has_seg=has_seg)
    return pl.pallas_call(
        kernel,
        grid=(sp // bk, b, kh),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qrow_spec, kvrow_spec, *seg_specs,
                  scalar_spec, scalar_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(p.k.shape, p.k.dtype)] * 2,
        compiler_params=c.triton_params(num_warps(hp), cfg.num_stages, cfg.interpret),
        interpret=cfg.interpret,
        name="flash_attention_dkdv",
    )(p.q, p.k, p.v, do_pad, lse, delta, p.q_pos, p.kv_pos, *segs, k_lo, k_hi)
