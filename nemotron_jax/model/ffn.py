"""FFN subblocks: SwiGLU and the linear replacement (the plain-XLA `swiglu` is `kernels/reference.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.kernels.reference import swiglu
from nemotron_jax.model.layers import RMSNorm, param
from nemotron_jax.model.lora import with_adapter
from nemotron_jax.sharding import constrain


class SwiGLU(nnx.Module):
    def __init__(self, hidden: int, width: int, eps: float, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(hidden, eps, param_dtype=param_dtype)
        self.gate = param(rngs, (hidden, width), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, (hidden, width), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, (width, hidden), ("mlp", "embed"), param_dtype)
        self.lora: nnx.Dict | None = nnx.data(None)  # adapters by projection (nemotron_jax.lora)

    def __call__(self, x_BxTxD: jax.Array, ffn_fn=swiglu) -> jax.Array:
        dtype = x_BxTxD.dtype
        if self.lora is not None:  # adapters sit between the matmuls: the XLA form, not a fused kernel
            h_BxTxD = self.norm(x_BxTxD)
            gate = with_adapter(h_BxTxD @ self.gate[...].astype(dtype), h_BxTxD, self.lora, "gate")
            up = with_adapter(h_BxTxD @ self.up[...].astype(dtype), h_BxTxD, self.lora, "up")
            act_BxTxF = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
            return with_adapter(act_BxTxF @ self.down[...].astype(dtype), act_BxTxF, self.lora, "down")
        return ffn_fn(self.norm(x_BxTxD), self.gate[...].astype(dtype), self.up[...].astype(dtype),
                      self.down[...].astype(dtype))


class LinearFFN(nnx.Module):
    """Puzzle's FFN replacement: one [hidden, hidden] map of the normed input."""

    def __init__(self, hidden: int, eps: float, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(hidden, eps, param_dtype=param_dtype)
        self.kernel = param(rngs, (hidden, hidden), ("embed", "mlp"), param_dtype)
        self.lora: nnx.Dict | None = nnx.data(None)

    def __call__(self, x_BxTxD: jax.Array, ffn_fn=None) -> jax.Array:
        h_BxTxD = self.norm(x_BxTxD)
        return with_adapter(h_BxTxD @ self.kernel[...].astype(x_BxTxD.dtype), h_BxTxD, self.lora, "kernel")
