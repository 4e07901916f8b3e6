"""LoRA adapters inside the projections: y = x·W + (alpha/r)·(dropout(x)·A)·B, B zero at the start.

A projection module (`GQAttention`, `SwiGLU`, `LinearAttention`, `LinearFFN`) holds its adapters
in `self.lora` (None, or an `nnx.Dict` projection name -> `LoRA`); `nemotron_jax.lora` adds and
removes them. The adapter weights are `LoRAParam`s, a `Variable` type that is *not* an
`nnx.Param` (unlike `nnx.LoRAParam`): everything that filters on `nnx.Param` (checkpoints, HF
conversion, shardings) keeps seeing only the base, and the train step splits the module into
adapters (trained) and the rest (frozen) with one filter.

A weight is flattened to [in, out] for its adapter, its axes in our order (q [D, N, H]: in D, out
N·H; o [N, H, D]: in N·H, out D), so A is [in, r] and B is [r, out].
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)


class LoRAParam(nnx.Variable):
    """An adapter weight: what a LoRA run trains (deliberately not an `nnx.Param`, see the module doc)."""


@contextlib.contextmanager
def lora_dropout(key: jax.Array | None) -> Iterator[None]:
    """Apply adapter dropout with `key` inside this block (the train step's loss); outside it
    (evaluation, sampling, export) adapters never drop."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class LoRA(nnx.Module):
    """One projection's adapter: A [in, r] (PEFT's kaiming-uniform init), B [r, out] zeros."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float, salt: int,
                 in_axis: str | None, out_axis: str | None, *, key: jax.Array):
        self.scale = float(alpha) / rank
        self.dropout = float(dropout)
        self.salt = salt  # folded into the dropout key: every adapter drops its own mask
        bound = in_dim ** -0.5
        self.a = LoRAParam(jax.random.uniform(key, (in_dim, rank), jnp.float32, -bound, bound),
                           logical_axes=(in_axis, None))
        self.b = LoRAParam(jnp.zeros((rank, out_dim), jnp.float32), logical_axes=(None, out_axis))

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        """(alpha/r)·(dropout(x)·A)·B for inputs flattened to [..., in]; [..., out] in x's dtype."""
        key = _DROPOUT_KEY.get()
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt), 1.0 - self.dropout, x_NxI.shape)
            x_NxI = jnp.where(keep, x_NxI / (1.0 - self.dropout), 0).astype(x_NxI.dtype)
        dtype = x_NxI.dtype
        low_NxR = x_NxI @ self.a[...].astype(dtype)
        return (low_NxR @ self.b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """The update it adds to the flattened weight: (alpha/r)·A·B [in, out], float32."""
        return self.scale * (self.a[...].astype(jnp.float32) @ self.b[...].astype(jnp.float32))


def with_adapter(y: jax.Array, x: jax.Array, adapters: nnx.Dict | None, name: str, in_axes: int = 1) -> jax.Array:
    """y (= x·W) plus the adapter `name` applied to x, if `adapters` has one; x's last `in_axes`
    axes are the weight's input axes (2 for o: heads, head_dim)."""
    if adapters is None or name not in adapters:
        return y
    x_flat = x.reshape(*x.shape[:x.ndim - in_axes], -1)
    return y + adapters[name](x_flat).reshape(y.shape).astype(y.dtype)
