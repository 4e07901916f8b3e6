"""Small building blocks: parameters with logical axis names, RMSNorm, RoPE.

Every parameter carries `logical_axes` metadata (e.g. `("embed", "mlp")`); `nemotron_jax.sharding`
maps those names to mesh axes by rules, so the modules never mention a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: jnp.dtype,
          fan_in: int | None = None) -> nnx.Param:
    """A weight drawn from N(0, 1/fan_in), tagged with the logical name of each axis."""
    assert len(shape) == len(axes), (shape, axes)
    fan_in = fan_in or shape[0]
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * (fan_in ** -0.5)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 as the reference implementations do."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * x).astype(x_BxTxD.dtype)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: tuple[float, ...]) -> jax.Array:
    """Rotate-half ("neox") rotary embedding; angles in float32."""
    angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(np.array(inv_freq, np.float32))
    angles_BxTx1xH = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTx1xH), jnp.sin(angles_BxTx1xH)
    x = x_BxTxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)
