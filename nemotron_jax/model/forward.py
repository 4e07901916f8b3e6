"""The pure forward pass, jitted once per (graph, shapes): the weights are an argument."""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx


@partial(jax.jit, static_argnums=0)
def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxT: jax.Array,
            positions_BxT: jax.Array | None = None, segment_ids_BxT: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, T, V]."""
    return nnx.merge(graphdef, state)(tokens_BxT, positions_BxT, segment_ids_BxT)[0]
