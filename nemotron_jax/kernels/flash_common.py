"""What the flash forward and backward kernels share: the static config, the padded operands
(the forward's residuals), the in-kernel mask and the per-block loop bounds.

Kept apart from both so that `flash_attention` -> `flash_backward` -> `flash_common` is a chain,
not a cycle.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nemotron_jax.kernels import _common as c


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static choices of one flash call; block sizes are powers of two >= 16 (Triton dot minimum).

    Backward blocks are named by role: a dQ program owns `block_outer_bwd` query rows and loops over
    KV in `block_inner_bwd` steps; a dK/dV program owns `block_outer_bwd` KV rows and loops over
    queries in `block_inner_bwd` steps (Triton's tutorial uses 128 / 32 for both on H100).
    """

    block_q: int
    block_k: int
    block_outer_bwd: int
    block_inner_bwd: int
    kv_len: int  # true S (keys at index >= kv_len are padding)
    interpret: bool
    num_stages: int = 2


class Prepared(NamedTuple):
    """Padded operands, kept as residuals for the backward pass (the true S is `FlashConfig.kv_len`)."""

    q: jax.Array  # [B, Tp, N, Hp]
    k: jax.Array  # [B, Sp, K, Hp]
    v: jax.Array
    q_pos: jax.Array  # [B, Tp] int32
    kv_pos: jax.Array  # [B, Sp] int32
    q_seg: jax.Array | None
    kv_seg: jax.Array | None


def key_mask(q_pos_Q: jax.Array, kv_pos_K: jax.Array, q_seg_Q: jax.Array | None, kv_seg_K: jax.Array | None,
             start: jax.Array, block: int, kv_len: int) -> jax.Array:
    """[Q, K] visibility inside a kernel: kv_pos <= q_pos, same segment, and a real (unpadded) key."""
    real_K = (start + jnp.arange(block, dtype=jnp.int32)) < kv_len
    mask = (kv_pos_K[None, :] <= q_pos_Q[:, None]) & real_K[None, :]
    if q_seg_Q is not None:
        mask &= q_seg_Q[:, None] == kv_seg_K[None, :]
    return mask


def block_bounds(p: Prepared, block_q: int, block_k: int) -> tuple[jax.Array, ...]:
    """(q-side lo, hi [B, nQ] over KV blocks; kv-side lo, hi [B, nK] over q blocks)."""
    vis_BxQxK = c.visible_blocks(p.q_pos, p.kv_pos, p.q_seg, p.kv_seg, block_q, block_k)
    q_lo, q_hi = c.span(vis_BxQxK)
    k_lo, k_hi = c.span(jnp.swapaxes(vis_BxQxK, 1, 2))
    return q_lo, q_hi, k_lo, k_hi


def num_warps(head_dim: int) -> int:
    """Triton warps per program: wider heads need more threads for the [block, Hp] tiles."""
    return 4 if head_dim <= 64 else 8
