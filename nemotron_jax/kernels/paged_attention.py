"""Attention against a paged KV cache: an XLA reference and a Pallas decode kernel.

A pool holds the keys (or values) of every GQA layer of one KV geometry: `pages_LxPxSxKxH`, page p
of layer l holding S consecutive positions of one sequence. A sequence's page table row lists its
pages in order, so the key in slot s of table entry m sits at position m * S + s. Entries past a
sequence's last page point at any page (the engine uses a reserved scratch page); they and the
unwritten tail of the last page are masked by position, exactly like the dense cache: a query at
position p sees keys at positions <= p.

Legend: B rows, T queries per row, N query heads, K KV heads, G = N / K, H head dim, L layers in
the pool, P pages in the pool, S page size (slots per page), M page-table entries per row.

- `paged_attention_reference` gathers the row's M pages into a contiguous [B, M*S, K, H] view and
  runs `reference.dot_product_attention` (any T: chunked prefill and decode).
- `paged_attention_kernel` is the decode kernel (T = 1): one program per (row, KV head) walks only
  the pages its length covers, reading each page straight from the pool through the page table
  (no gathered copy), with an online softmax over the G query heads of that KV head as one tile.
  Pallas interpret mode on CPU (tests), Triton on GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nemotron_jax.kernels import _common as c
from nemotron_jax.kernels.reference import dot_product_attention


def paged_attention_reference(q_BxTxNxH: jax.Array, k_pages_LxPxSxKxH: jax.Array, v_pages_LxPxSxKxH: jax.Array,
                              q_pos_BxT: jax.Array, page_table_BxM: jax.Array, layer: int = 0) -> jax.Array:
    """Causal GQA attention of each row's queries over its pages (plain XLA; any T)."""
    b, m = page_table_BxM.shape
    _, _, s, kh, h = k_pages_LxPxSxKxH.shape
    # One gather per pool (layer index and page ids together), not a slice of the layer first.
    k_BxMxSxKxH = k_pages_LxPxSxKxH[layer, page_table_BxM]
    v_BxMxSxKxH = v_pages_LxPxSxKxH[layer, page_table_BxM]
    kv_pos_BxMS = jnp.broadcast_to(jnp.arange(m * s, dtype=jnp.int32), (b, m * s))
    return dot_product_attention(q_BxTxNxH, k_BxMxSxKxH.reshape(b, m * s, kh, h).astype(q_BxTxNxH.dtype),
                                 v_BxMxSxKxH.reshape(b, m * s, kh, h).astype(q_BxTxNxH.dtype),
                                 q_pos_BxT, kv_pos_BxMS)


def kernel_unsupported(q_BxTxNxH: jax.Array, k_pages_LxPxSxKxH: jax.Array) -> str | None:
    """Why the Pallas kernel cannot take these operands (None if it can)."""
    t, n, h = q_BxTxNxH.shape[1:]
    s, kh = k_pages_LxPxSxKxH.shape[2], k_pages_LxPxSxKxH.shape[3]
    if t != 1:
        return f"the paged kernel decodes one query per row, got T={t}"
    if n % kh:
        return f"{n} query heads are not a multiple of {kh} KV heads"
    if h % 16 or h & (h - 1):
        return f"head_dim {h} is not a power of two >= 16"
    if s & (s - 1):
        return f"page size {s} is not a power of two"
    if jax.default_backend() not in ("cpu", "gpu"):
        return f"no paged kernel for backend {jax.default_backend()!r}"
    return None


def paged_attention(q_BxTxNxH: jax.Array, k_pages_LxPxSxKxH: jax.Array, v_pages_LxPxSxKxH: jax.Array,
                    q_pos_BxT: jax.Array, page_table_BxM: jax.Array, layer: int = 0, *,
                    impl: str = "xla") -> jax.Array:
    """The engine's entry point: the kernel for decode steps it takes, else the reference."""
    if impl == "pallas":
        reason = kernel_unsupported(q_BxTxNxH, k_pages_LxPxSxKxH)
        if reason is None:
            return paged_attention_kernel(q_BxTxNxH, k_pages_LxPxSxKxH, v_pages_LxPxSxKxH, q_pos_BxT,
                                          page_table_BxM, layer)
        c.warn_once(reason)
    elif impl != "xla":
        raise ValueError(f"unknown paged attention impl {impl!r}; expected 'xla' or 'pallas'")
    return paged_attention_reference(q_BxTxNxH, k_pages_LxPxSxKxH, v_pages_LxPxSxKxH, q_pos_BxT,
                                     page_table_BxM, layer)


def paged_attention_kernel(q_BxTxNxH: jax.Array, k_pages_LxPxSxKxH: jax.Array, v_pages_LxPxSxKxH: jax.Array,
                           q_pos_BxT: jax.Array, page_table_BxM: jax.Array, layer: int = 0,
                           interpret: bool | None = None) -> jax.Array:
    """Decode attention (T = 1) reading pages in place; same contract as the reference."""
    reason = kernel_unsupported(q_BxTxNxH, k_pages_LxPxSxKxH)
    if reason is not None:
        raise ValueError(reason)
    interpret = c.interpret_mode() if interpret is None else interpret
    b, _, n, h = q_BxTxNxH.shape
    m = page_table_BxM.shape[1]
    s, kh = k_pages_LxPxSxKxH.shape[2], k_pages_LxPxSxKxH.shape[3]
    g = n // kh
    rows = max(16, c.next_pow2(g))  # query-head rows of one tile, padded for the Triton dot
    q_BxKxRxH = c.pad_axis(q_BxTxNxH.reshape(b, kh, g, h), 2, rows)
    kernel = functools.partial(_kernel, layer=layer, page_size=s, max_pages=m, scale=h ** -0.5)
    whole = lambda x: pl.BlockSpec(x.shape, lambda bi, ki: (0,) * x.ndim)
    out = pl.pallas_call(
        kernel,
        grid=(b, kh),
        in_specs=[whole(page_table_BxM), pl.BlockSpec((None,), lambda bi, ki: (bi,)),
                  pl.BlockSpec((None, None, rows, h), lambda bi, ki: (bi, ki, 0, 0)),
                  whole(k_pages_LxPxSxKxH), whole(v_pages_LxPxSxKxH)],
        out_specs=pl.BlockSpec((None, None, rows, h), lambda bi, ki: (bi, ki, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh, rows, h), q_BxTxNxH.dtype),
        compiler_params=c.triton_params(4, 2, interpret),
        interpret=interpret,
        name="paged_decode_attention",
    )(page_table_BxM.astype(jnp.int32), q_pos_BxT[:, 0].astype(jnp.int32), q_BxKxRxH,
      k_pages_LxPxSxKxH, v_pages_LxPxSxKxH)
    return out[:, :, :g].reshape(b, 1, n, h)


def _kernel(table_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, layer: int, page_size: int, max_pages: int,
            scale: float) -> None:
    """One (row, KV head): online softmax over the pages holding positions 0..pos."""
    row, head = pl.program_id(0), pl.program_id(1)
    q_RxH = q_ref[...].astype(jnp.float32)
    pos = pos_ref[()]
    num_pages = jnp.minimum(pos // page_size + 1, max_pages)

    def body(j, carry):
        acc_RxH, m_R, l_R = carry
        page = table_ref[row, j]
        k_SxH = k_ref[layer, page, :, head, :].astype(jnp.float32)
        v_SxH = v_ref[layer, page, :, head, :].astype(jnp.float32)
        visible_S = j * page_size + jnp.arange(page_size, dtype=jnp.int32) <= pos
        s_RxS = jnp.where(visible_S[None, :], c.dot(q_RxH, k_SxH, (1, 1)) * scale, c.NEG)
        m_new_R = jnp.maximum(m_R, jnp.max(s_RxS, axis=1))
        alpha_R = jnp.exp(m_R - m_new_R)
        p_RxS = jnp.where(visible_S[None, :], jnp.exp(s_RxS - m_new_R[:, None]), 0.0)
        return (alpha_R[:, None] * acc_RxH + c.dot(p_RxS, v_SxH), m_new_R,
                alpha_R * l_R + jnp.sum(p_RxS, axis=1))

    r, h = q_RxH.shape
    init = (jnp.zeros((r, h), jnp.float32), jnp.full((r,), c.NEG, jnp.float32), jnp.zeros((r,), jnp.float32))
    acc_RxH, _, l_R = jax.lax.fori_loop(0, num_pages, body, init)
    o_ref[...] = (acc_RxH / jnp.where(l_R > 0, l_R, 1.0)[:, None]).astype(o_ref.dtype)
