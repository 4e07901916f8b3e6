"""Pallas kernels for the hot paths, each beside its XLA reference, chosen by `Policy`.

`attention_fn(impl)` / `ffn_fn(impl)` return callables with exactly the reference signatures
(`reference.dot_product_attention`, `reference.swiglu`):

    "xla"     the references themselves (`reference.py`; model/ uses them as its defaults).
    "pallas"  per call, at trace time:
              attention on GPU/CPU: decode kernel when T is small and there are no segment ids (the
              sampler's T=1 step against a cache), else flash attention (fwd + bwd kernels);
              attention on TPU: JAX's splash attention where it provably matches (`tpu.py`);
              SwiGLU on GPU/CPU: the fused gate/up kernel (`swiglu.py`); on TPU the reference.
              Shapes or dtypes a kernel does not take run the reference, with the reason logged at
              WARNING once (logger "nemotron_jax.kernels").

The platform is the host's backend, or the one named by `target_platform(...)` around tracing (an
ahead-of-time compile for a TPU slice on a CPU host). CPU runs the kernels in Pallas interpret mode
(slow, for tests); GPU compiles them with Triton.
Block sizes: GPU defaults below (untuned guesses until benchmarked, see docs/benchmarks.md);
interpret mode uses 16 so that tiny test shapes still span several blocks. The kernel functions
take block sizes as keywords for direct use and tuning.

The kernels see whole arrays: under a multi-device layout wrap them in `shard_map` (batch/heads
sharding) rather than relying on automatic partitioning of the custom calls.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from nemotron_jax.kernels import reference as _reference
from nemotron_jax.kernels._common import platform, warn_once
from nemotron_jax.kernels._common import target_platform as target_platform  # re-exported

# The references are reached through their modules: the submodules `swiglu`, `flash_attention`, ...
# become attributes of this package when imported and would shadow same-named functions here.
IMPLS = ("xla", "pallas")
DECODE_MAX_T = 8  # at most this many new tokens per row use the decode kernel...
DECODE_MAX_ROWS = 64  # ...and only while the T * G query rows fit one register tile
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
GPU_BLOCKS = {"flash": dict(block_q=128, block_k=64, block_outer_bwd=64, block_inner_bwd=32),
               "decode": dict(block_k=128), "swiglu": dict(block_m=64, block_f=128, block_d=64)}
INTERPRET_BLOCKS = {"flash": dict(block_q=16, block_k=16, block_outer_bwd=16, block_inner_bwd=16),
                     "decode": dict(block_k=16), "swiglu": dict(block_m=16, block_f=128, block_d=32)}

AttentionFn = Callable[..., jax.Array]
FFNFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def attention_fn(impl: str) -> AttentionFn:
    """The attention callable for `Policy.attention_impl`; ValueError for an unknown name."""
    if impl == "xla":
        return _reference.dot_product_attention
    if impl == "pallas":
        return pallas_attention
    raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")


def ffn_fn(impl: str) -> FFNFn:
    """The SwiGLU callable for `Policy.ffn_impl`; ValueError for an unknown name."""
    if impl == "xla":
        return _reference.swiglu
    if impl == "pallas":
        return pallas_swiglu
    raise ValueError(f"unknown ffn_impl {impl!r}; expected one of {IMPLS}")


def _blocks(kind: str) -> dict[str, int]:
    return dict((INTERPRET_BLOCKS if platform() == "cpu" else GPU_BLOCKS)[kind])


def attention_unsupported(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array) -> str | None:
    """Why the attention kernels cannot take these operands, or None if they can."""
    h, n, kh = q_BxTxNxH.shape[3], q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
    if platform() not in ("cpu", "gpu", "tpu"):
        return f"no attention kernel for backend {platform()!r}"
    if h % 16:
        return f"head_dim {h} is not a multiple of 16"
    if n % kh:
        return f"{n} query heads are not a multiple of {kh} KV heads"
    dtypes = {jnp.dtype(x.dtype) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        return f"attention dtypes {q_BxTxNxH.dtype}/{k_BxSxKxH.dtype}/{v_BxSxKxH.dtype} (need one of f32/bf16/f16)"
    return None


def pallas_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                     q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array, q_seg_BxT: jax.Array | None = None,
                     kv_seg_BxS: jax.Array | None = None) -> jax.Array:
    """`dot_product_attention` through the kernels (see module docstring for the choice)."""
    args = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, kv_pos_BxS, q_seg_BxT, kv_seg_BxS)
    reason = attention_unsupported(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
    if reason is not None:
        warn_once(reason)
        return _reference.dot_product_attention(*args)
    if platform() == "tpu":
        from nemotron_jax.kernels.tpu import splash_attention

        return splash_attention(*args, reference=_reference.dot_product_attention)
    t, g = q_BxTxNxH.shape[1], q_BxTxNxH.shape[2] // k_BxSxKxH.shape[2]
    if q_seg_BxT is None and t <= DECODE_MAX_T and t * g <= DECODE_MAX_ROWS:
        from nemotron_jax.kernels.decode_attention import decode_attention

        return decode_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, kv_pos_BxS, **_blocks("decode"))
    from nemotron_jax.kernels.flash_attention import flash_attention

    return flash_attention(*args, **_blocks("flash"))


def ffn_unsupported(h_BxTxD: jax.Array, gate_DxF: jax.Array, up_DxF: jax.Array, down_FxD: jax.Array) -> str | None:
    """Why the fused SwiGLU kernel cannot take these operands, or None if it can."""
    d, f = gate_DxF.shape
    if platform() not in ("cpu", "gpu"):
        return f"no fused SwiGLU kernel for backend {platform()!r}"
    if f % 256:
        return f"FFN width {f} is not a multiple of 256"
    if d % 16:
        return f"hidden size {d} is not a multiple of 16"
    dtypes = sorted({str(jnp.dtype(x.dtype)) for x in (h_BxTxD, gate_DxF, up_DxF, down_FxD)})
    if len(dtypes) != 1 or jnp.dtype(dtypes[0]) not in _DTYPES:
        return f"SwiGLU dtypes {dtypes} (need one shared f32/bf16/f16)"
    return None


def pallas_swiglu(h_BxTxD: jax.Array, gate_DxF: jax.Array, up_DxF: jax.Array, down_FxD: jax.Array) -> jax.Array:
    """`swiglu` with gate/up/silu fused in a Pallas kernel (falls back with a logged reason)."""
    reason = ffn_unsupported(h_BxTxD, gate_DxF, up_DxF, down_FxD)
    if reason is not None:
        warn_once(reason)
        return _reference.swiglu(h_BxTxD, gate_DxF, up_DxF, down_FxD)
    from nemotron_jax.kernels.swiglu import fused_swiglu

    return fused_swiglu(h_BxTxD, gate_DxF, up_DxF, down_FxD, **_blocks("swiglu"))
