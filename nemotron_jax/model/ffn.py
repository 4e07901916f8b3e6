"""FFN subblocks: SwiGLU and the linear replacement (the plain-XLA `swiglu` is `kernels/reference.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.kernels.reference import swiglu
from nemotron_jax.model.layers import RMSNorm, param


class SwiGLU(nnx.Module):
    def __init__(self, hidden: int, width: int, eps: float, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(hidden, eps, param_dtype=param_dtype)
        self.gate = param(rngs, (hidden, width), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, (hidden, width), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, (width, hidden), ("mlp", "embed"), param_dtype)

    def __call__(self, x_BxTxD: jax.Array, ffn_fn=swiglu) -> jax.Array:
        dtype = x_BxTxD.dtype
        return ffn_fn(self.norm(x_BxTxD), self.gate[...].astype(dtype), self.up[...].astype(dtype),
                      self.down[...].astype(dtype))


class LinearFFN(nnx.Module):
    """Puzzle's FFN replacement: one [hidden, hidden] map of the normed input."""

    def __init__(self, hidden: int, eps: float, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(hidden, eps, param_dtype=param_dtype)
        self.kernel = param(rngs, (hidden, hidden), ("embed", "mlp"), param_dtype)

    def __call__(self, x_BxTxD: jax.Array, ffn_fn=None) -> jax.Array:
        return self.norm(x_BxTxD) @ self.kernel[...].astype(x_BxTxD.dtype)
