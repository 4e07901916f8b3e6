"""Weight-only quantization of the projections: int8 per output channel, int4 in groups along the input.

    W [in..., out...] -> flat [in, out] -> [G, g, out] integers (g = in for int8) and float32
    scales [G, 1, out] = max|W| over each group / qmax;  W ≈ values · scale

A quantized weight is a `QArray` stored as the value of the same `nnx.Param`, so paths, the
graph and the modules are unchanged: `param[...]` and `.astype(dtype)` dequantize on the fly
inside the jitted forward (XLA fuses the scale into the matmul's operand), so every projection,
the sampler and the LoRA train step run on it as they are. The embedding, the LM head and the
norms stay in float. Saving a quantized model writes the dequantized weights.

Why not qwix: qwix's PTQ intercepts `dot_general`/`einsum` calls while re-tracing the module
with sample inputs and swaps the module's params for its own `WithAux` arrays; our projections also
run through fused kernels (`ffn_fn`, the Pallas SwiGLU) and through `nnx.split`/`merge` pure
functions (the jitted forward, the scanned layers, the sampler), which that interception does not
see, and the swapped params would break the Param paths the HF conversion and shardings key on.
Symmetric round-to-nearest with per-channel / grouped scales is all it would do for weights here.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

Bits = Literal["int8", "int4"]
QMAX = {"int8": 127, "int4": 7}
STORAGE = {"int8": jnp.int8, "int4": jnp.int4}
INT4_GROUP = 128
PROJECTIONS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1, "kernel": 1}  # name -> input axes


@flax.struct.dataclass
class QArray:
    """A quantized weight: `values` [G, g, out] integers, `scale` [G, 1, out] float32; `shape` the
    weight's own shape. Duck-types the two array operations the modules use on a weight."""

    values: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: jnp.dtype = flax.struct.field(pytree_node=False)  # the float dtype it stands for

    def dequantize(self, dtype: jnp.dtype | None = None) -> jax.Array:
        w = self.values.astype(jnp.float32) * self.scale
        return w.reshape(self.shape).astype(dtype or self.dtype)

    def __getitem__(self, index: object) -> jax.Array:
        return self.dequantize()[index]

    def astype(self, dtype: jnp.dtype) -> jax.Array:
        return self.dequantize(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Packed storage: int4 counts half a byte per value (XLA packs it on TPU and GPU)."""
        bits = 4 if self.values.dtype == jnp.int4 else 8 * self.values.dtype.itemsize
        return self.values.size * bits // 8 + self.scale.nbytes


def group_size(in_dim: int, bits: Bits, group: int = INT4_GROUP) -> int:
    """int8: one group (per output channel); int4: `group` rows, or the largest divisor of in_dim below it."""
    return in_dim if bits == "int8" else math.gcd(in_dim, group)


@functools.partial(jax.jit, static_argnames=("bits", "in_axes", "group"))
def quantize_array(w: jax.Array, bits: Bits, in_axes: int = 1, group: int = INT4_GROUP) -> QArray:
    """Symmetric round-to-nearest quantization of one weight (its first `in_axes` axes are inputs)."""
    in_dim = math.prod(w.shape[:in_axes])
    g = group_size(in_dim, bits, group)
    w_GxgxO = w.astype(jnp.float32).reshape(in_dim // g, g, -1)
    qmax = QMAX[bits]
    scale = jnp.max(jnp.abs(w_GxgxO), axis=1, keepdims=True) / qmax
    scale = jnp.where(scale == 0, 1.0, scale)
    values = jnp.clip(jnp.round(w_GxgxO / scale), -qmax, qmax).astype(STORAGE[bits])
    return QArray(values, scale, tuple(w.shape), jnp.dtype(w.dtype))


def is_quantized(module: nnx.Module) -> bool:
    return any(isinstance(v.get_value(), QArray) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def quantize_module(module: nnx.Module, bits: Bits, group: int = INT4_GROUP) -> nnx.Module:
    """A copy of `module` whose projection weights are `QArray`s (already quantized ones are kept);
    the other weights are the same arrays, not copies."""
    if bits not in QMAX:
        raise ValueError(f"quantize must be one of {sorted(QMAX)} or None, got {bits!r}")
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    flat = []
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        name = path[-1]
        if name in PROJECTIONS and "layers" in path and not isinstance(value, QArray):
            value = quantize_array(value, bits, PROJECTIONS[name], group)
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def weight_bytes(module: nnx.Module) -> int:
    """Bytes the weights take as stored (int4 counted packed)."""
    return sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def storage_layout(shape: tuple[int, ...], logical_axes: tuple[str | None, ...], bits: Bits, in_axes: int = 1,
                   group: int = INT4_GROUP) -> tuple[tuple[tuple[int, ...], tuple], tuple[tuple[int, ...], tuple]]:
    """((shape, logical axes) of `values`, same of `scale`) for a weight of `shape` / `logical_axes`.

    values [G, g, out] carry the input's axis name on G and g (a mesh axis shards G when it divides
    it, else g: int8 has G = 1) and the first output axis's name on out; scale [G, 1, out] likewise.
    The planner and the compiled abstract model (`aot`) shard quantized weights by this."""
    in_dim, out_dim = math.prod(shape[:in_axes]), math.prod(shape[in_axes:])
    g = group_size(in_dim, bits, group)
    i, o = logical_axes[0], logical_axes[in_axes]
    return ((in_dim // g, g, out_dim), (i, i, o)), ((in_dim // g, 1, out_dim), (i, None, o))
