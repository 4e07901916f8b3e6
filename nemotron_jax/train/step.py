"""The one train step: `train_step(state, batch) -> (state, metrics)`, pure and jitted.

Built from a strategy (what loss), an optax transformation (what update) and a layout (where
arrays live). Gradient accumulation is a scan over microbatches whose gradients and loss sums add
up to exactly the full-batch ones. A step whose loss, gradients or updated weights are not finite
changes nothing but the step counter and the non-finite counters; its metrics say `nonfinite: 1`.

A batch is a dict of [B, T] arrays: inputs, targets, weights, positions, segment_ids.

With LoRA, `state.params` holds only the adapters (what is differentiated and optimised) and the
frozen base is `frozen`, a separate, non-donated jit argument: the module is
`nnx.merge(graphdef, params, frozen)` inside the loss, and nothing of the base is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from nemotron_jax.data.batch import TokenBatch as Batch
from nemotron_jax.model.lora import lora_dropout
from nemotron_jax.sharding import Layout, use_layout
from nemotron_jax.train.state import TrainState
from nemotron_jax.train.strategies import Strategy

Metrics = dict[str, jax.Array]
Teacher = tuple[nnx.GraphDef, nnx.State]
BATCH_AXES = ("batch", "seq")


def batch_shardings(layout: Layout | None, batch_shape: tuple[int, int]) -> NamedSharding | None:
    return None if layout is None else layout.sharding(BATCH_AXES, batch_shape)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def merge_module(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None) -> nnx.Module:
    """The module from what is trained and (with LoRA) the frozen rest."""
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def _loss_and_grads(strategy: Strategy, graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef | None,
                    params: nnx.State, batch: Batch, teacher_params: nnx.State | None,
                    grad_accum: int, frozen: nnx.State | None = None, dropout_key: jax.Array | None = None,
                    ) -> tuple[jax.Array, dict[str, jax.Array], nnx.State]:
    """(loss, metric sums, grads) with loss = Σ weighted token loss / Σ weights over the batch."""
    total_w = jnp.maximum(jnp.sum(batch.weights), 1.0)

    def loss_fn(params, micro, key):
        teacher = None if teacher_graphdef is None else nnx.merge(teacher_graphdef, teacher_params)
        with lora_dropout(key):
            loss_sum, sums = strategy.loss(merge_module(graphdef, params, frozen), micro, teacher)
        return loss_sum / total_w, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, sums), grads = grad_fn(params, batch, dropout_key)
        return loss, sums, grads
    rows = batch.inputs.shape[0]
    if rows % grad_accum:
        raise ValueError(f"batch of {rows} rows does not split into grad_accum={grad_accum} microbatches")
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, rows // grad_accum, *x.shape[1:]), batch)

    def body(carry, mb_index):
        mb, index = mb_index
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        (loss, sums), grads = grad_fn(params, mb, key)
        return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, dropout_key))
    (loss, sums), grads = zeros
    return jax.lax.scan(body, (loss, sums, grads), (micro, jnp.arange(grad_accum)))[0]


def make_train_step(strategy: Strategy, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, teacher: Teacher | None = None, layout: Layout | None = None,
                    state_shardings: TrainState | None = None, grad_accum: int = 1,
                    frozen: nnx.State | None = None,
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step(state, batch)`; the teacher's weights and the `frozen` base (LoRA) are jit
    arguments, never baked constants, and never donated.

    The input state is donated: do not use it after the call.
    """
    if strategy.needs_teacher and teacher is None:
        raise ValueError("this strategy needs a teacher model")
    teacher_graphdef, teacher_params = teacher if teacher is not None else (None, None)

    def step(state: TrainState, batch: Batch, teacher_params: nnx.State | None,
             frozen: nnx.State | None) -> tuple[TrainState, Metrics]:
        rng, dropout_key = jax.random.split(state.rng)
        loss, sums, grads = _loss_and_grads(strategy, graphdef, teacher_graphdef, state.params, batch,
                                            teacher_params, grad_accum, frozen, dropout_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        bad = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            rng=rng, nonfinite_count=state.nonfinite_count + bad,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        weight = jnp.sum(batch.weights)
        denom = jnp.maximum(weight, 1.0)
        metrics = {"loss": loss, "tokens": weight, "grad_norm": grad_norm,
                   "lr": schedule(state.step - state.nonfinite_count),
                   "nonfinite": bad, "nonfinite_streak": new_state.nonfinite_streak,
                   **{k: v / denom for k, v in sums.items()}}
        return new_state, metrics

    if layout is None:
        jitted = jax.jit(step, donate_argnums=0)
    else:
        teacher_shardings = None if teacher is None else jax.tree.map(lambda x: x.sharding, teacher_params)
        frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
        batch_sharding = NamedSharding(layout.mesh, layout.spec(BATCH_AXES))
        jitted = jax.jit(step, donate_argnums=0,
                         in_shardings=(state_shardings, batch_sharding, teacher_shardings, frozen_shardings),
                         out_shardings=(state_shardings, NamedSharding(layout.mesh, jax.sharding.PartitionSpec())))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with use_layout(layout):
            return jitted(state, batch, teacher_params, frozen)

    train_step.lower = lambda state, batch: jitted.lower(state, batch, teacher_params, frozen)  # AOT / inspection
    return train_step


def make_eval_step(strategy: Strategy, graphdef: nnx.GraphDef, *, teacher: Teacher | None = None,
                   layout: Layout | None = None, frozen: nnx.State | None = None,
                   ) -> Callable[[nnx.State, Batch], Metrics]:
    """`eval_step(params, batch)` -> {loss_sum, weight, <metric>_sum}: sums, so batches add up."""
    teacher_graphdef, teacher_params = teacher if teacher is not None else (None, None)

    @jax.jit
    def step(params: nnx.State, batch: Batch, teacher_params: nnx.State | None,
             frozen: nnx.State | None) -> Metrics:
        t = None if teacher_graphdef is None else nnx.merge(teacher_graphdef, teacher_params)
        loss_sum, sums = strategy.loss(merge_module(graphdef, params, frozen), batch, t)
        return {"loss": loss_sum, "weight": jnp.sum(batch.weights), **sums}

    def eval_step(params: nnx.State, batch: Batch) -> Metrics:
        with use_layout(layout):
            return step(params, batch, teacher_params, frozen)

    return eval_step
