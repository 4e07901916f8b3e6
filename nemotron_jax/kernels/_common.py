"""What every kernel shares: backend choice, padding, block bounds, and logged fallbacks.

Masking is the reference's rule (`reference.py`): query at position p sees keys at positions
<= p in the same segment. Kernels apply it exactly, element by element; the block bounds here only
let them skip blocks that are *certainly* fully masked, so they are conservative by construction.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger("nemotron_jax.kernels")

NEG = -1e30  # finite "minus infinity": NEG - NEG == 0, so empty rows never produce NaN
BIG_LSE = 1e30  # logsumexp stored for rows that see nothing: exp(s - BIG_LSE) == 0
INT_MIN = int(jnp.iinfo(jnp.int32).min)
INT_MAX = int(jnp.iinfo(jnp.int32).max)

_logged: set[str] = set()
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("nemotron_jax_kernel_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str | None) -> Iterator[None]:
    """Choose kernels for `platform` (cpu | gpu | tpu) while tracing inside this block, not for the
    host's backend: `nemotron-jax compile` traces a TPU slice's program on a CPU host."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def platform() -> str:
    """The platform kernels are chosen for: `target_platform`'s, else `jax.default_backend()`."""
    return _PLATFORM.get() or jax.default_backend()


def warn_once(reason: str) -> None:
    """Log a fallback reason at WARNING, once per distinct reason per process."""
    if reason not in _logged:
        _logged.add(reason)
        log.warning("pallas kernel falls back to XLA: %s", reason)


def interpret_mode() -> bool:
    """CPU runs Pallas in interpret mode (tests); GPU compiles through Triton."""
    return platform() == "cpu"


def triton_params(num_warps: int, num_stages: int, interpret: bool) -> Any:
    """Triton compiler params whenever compiling (None when interpreting).

    Passing them explicitly matters: recent JAX lowers a bare `pl.pallas_call` with Mosaic GPU
    (`jax_pallas_use_mosaic_gpu` defaults to True), and these kernels are written for Triton.
    """
    if interpret:
        return None
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - depends on the jaxlib build
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    """Pad `axis` of x at the end up to `size` (no-op when already that long)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def block_reduce(x_BxL: jax.Array, block: int, op: str, pad: int) -> jax.Array:
    """min/max of each length-`block` run along the last axis: [B, L] -> [B, ceil(L/block)]."""
    b, n = x_BxL.shape
    x = pad_axis(x_BxL, 1, round_up(n, block), pad).reshape(b, -1, block)
    return x.min(axis=-1) if op == "min" else x.max(axis=-1)


def visible_blocks(q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array, q_seg_BxT: jax.Array | None,
                   kv_seg_BxS: jax.Array | None, block_q: int, block_k: int) -> jax.Array:
    """[B, nQ, nK] bool: may any query of q block i see any key of kv block j?

    A superset of the truth (min/max summaries per block), so skipping the False blocks never
    drops a visible key. Padding is summarised with values that never widen a block's range.
    """
    qmax = block_reduce(q_pos_BxT, block_q, "max", INT_MIN)
    kvmin = block_reduce(kv_pos_BxS, block_k, "min", INT_MAX)
    vis_BxQxK = kvmin[:, None, :] <= qmax[:, :, None]
    if q_seg_BxT is not None:
        qs_lo = block_reduce(q_seg_BxT, block_q, "min", INT_MAX)
        qs_hi = block_reduce(q_seg_BxT, block_q, "max", INT_MIN)
        ks_lo = block_reduce(kv_seg_BxS, block_k, "min", INT_MAX)
        ks_hi = block_reduce(kv_seg_BxS, block_k, "max", INT_MIN)
        vis_BxQxK &= (ks_lo[:, None, :] <= qs_hi[:, :, None]) & (ks_hi[:, None, :] >= qs_lo[:, :, None])
    return vis_BxQxK


def span(vis_BxRxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) over the last axis covering every True entry; (0, 0) for rows with none. int32 [B, R]."""
    c = vis_BxRxC.shape[-1]
    idx = jnp.arange(c, dtype=jnp.int32)
    lo = jnp.min(jnp.where(vis_BxRxC, idx, c), axis=-1)
    hi = jnp.max(jnp.where(vis_BxRxC, idx + 1, 0), axis=-1)
    return jnp.minimum(lo, hi).astype(jnp.int32), hi.astype(jnp.int32)


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """2-D matmul with float32 accumulation; `contract` picks the contracted axis of a and b.

    (1, 0) is a @ b, (1, 1) is a @ b.T, (0, 0) is a.T @ b. Written as dot_general because that is
    what both the interpreter and the Triton lowering accept for transposed operands.
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
