"""`TrainState`: everything a step reads and writes, as one pytree (what a checkpoint holds).

`step` counts batches consumed (skipped non-finite steps included, so resuming lines up with the
data iterator); the optimiser's own count, inside `opt_state`, counts updates actually applied.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from nemotron_jax.sharding import Layout


@flax.struct.dataclass
class TrainState:
    step: jax.Array              # int32 scalar: batches consumed
    params: nnx.State            # the model's parameters (float32 masters)
    opt_state: optax.OptState
    rng: jax.Array               # uint32[2] key, split once per step
    nonfinite_count: jax.Array   # int32: steps skipped because loss/grads/params were not finite
    nonfinite_streak: jax.Array  # int32: consecutive such steps up to now


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int,
               layout: Layout | None = None) -> TrainState:
    """A fresh state; optimiser moments are created in the parameters' shardings."""
    shardings = state_shardings_for(params, tx, layout)
    zero = jnp.zeros((), jnp.int32)

    def make(params):
        return TrainState(step=zero, params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(seed), nonfinite_count=zero, nonfinite_streak=zero)

    return jax.jit(make, out_shardings=shardings)(params)


def state_shardings_for(params: nnx.State, tx: optax.GradientTransformation,
                        layout: Layout | None) -> TrainState:
    """Shardings of every state leaf: a moment shards like its parameter; scalars are replicated."""
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    if layout is None:
        replicated: Any = SingleDeviceSharding(jax.devices()[0])
    else:
        replicated = NamedSharding(layout.mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
                      nonfinite_count=replicated, nonfinite_streak=replicated)


def abstract_state(state: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint of `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
