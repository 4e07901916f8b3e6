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
Under a multi-device layout the whole choice runs per shard inside `shard_map` (Mosaic kernels are
not partitioned automatically), at default matmul precision (Mosaic rejects fp32 contraction
precision on bf16 operands, which `jax_default_matmul_precision="highest"` would ask for).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nemotron_jax.kernels._common import warn_once
from nemotron_jax.sharding import Layout, current_layout


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq: int, heads: int, interpret: bool) -> Any:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((seq, seq))] * heads)
    with jax.ensure_compile_time_eval():  # its mask arrays concrete, never a tracer of whichever trace came first
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
    layout = current_layout()
    if layout is None or layout.mesh.size == 1:
        return _splash_or_reference(*args, reference=reference)
    return _per_shard(layout, functools.partial(_splash_or_reference, reference=reference), *args)


def _splash_or_reference(*args: Any, reference: Callable[..., jax.Array]) -> jax.Array:
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, kv_pos_BxS, q_seg_BxT, kv_seg_BxS = args
    splash = lambda: _at_default_precision(splash_causal)(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_seg_BxT)
    return jax.lax.cond(index_causal(q_pos_BxT, kv_pos_BxS, q_seg_BxT, kv_seg_BxS), splash,
                        lambda: chunked_reference(reference, *args))


def _at_default_precision(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fn`, forward and backward traced at default matmul precision, if another is configured:
    Mosaic rejects fp32 contraction precision on bf16 operands (`jax_default_matmul_precision=
    "highest"`, as the tests set). A `with` around the call alone would not cover the backward
    kernels, traced later when the step is differentiated: here the backward is the forward's own
    pullback, applied under it too."""
    if jax.config.jax_default_matmul_precision in (None, "default", "bfloat16", "fastest"):
        return fn

    @jax.custom_vjp
    def wrapped(*args: Any) -> jax.Array:
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def forward(*args: Any) -> tuple[jax.Array, Any]:
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)  # the pullback is a pytree of the kernel's residuals

    def backward(pullback: Any, g: jax.Array) -> Any:
        with jax.default_matmul_precision("default"):
            return pullback(g)

    wrapped.defvjp(forward, backward)
    return wrapped


def _per_shard(layout: Layout, fn: Callable[..., jax.Array], *args: jax.Array | None) -> jax.Array:
    """`fn` on each device's rows and heads (`shard_map`): Mosaic kernels are not partitioned
    automatically. Rows split as the layout splits the batch; heads split only when both the query
    and the KV heads split alike (else GQA's grouping would change), and never the sequence."""
    q, k = args[0], args[1]
    q_spec = layout.spec(("batch", None, "act_heads", None), q.shape)  # type: ignore[union-attr]
    kv_spec = layout.spec(("batch", None, "act_kv_heads", None), k.shape)  # type: ignore[union-attr]
    if q_spec[2] != kv_spec[2]:
        q_spec = kv_spec = PartitionSpec(q_spec[0], None, None, None)
    row = PartitionSpec(q_spec[0], None)
    specs = (q_spec, kv_spec, kv_spec, row, row, row, row)
    present = [i for i, a in enumerate(args) if a is not None]

    def local(*xs: jax.Array) -> jax.Array:
        full: list[jax.Array | None] = [None] * len(args)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        return fn(*full)

    return jax.shard_map(local, mesh=layout.mesh, in_specs=tuple(specs[i] for i in present), out_specs=q_spec,
                         check_vma=False)(*(args[i] for i in present))


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
