"""The jitted programs a run executes, built on abstract sharded inputs (no weights in memory).

`abstract_step` is the one place that constructs batches and calls into train/, rl/ and
sampling/: when their signatures change, only this function changes. Each program is the one
the recipe itself jits (`make_train_step` with the strategy and optimiser the recipe builds, the
sampler's `prefill` / `decode`), so its compiled memory and cost are the run's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nemotron_jax.config import ModelConfig
from nemotron_jax.lora import LoRAConfig
from nemotron_jax.model.lora import LoRAParam
from nemotron_jax.model.transformer import Policy
from nemotron_jax.plan import abstract_run_model, stored_axes
from nemotron_jax.quantize import QArray
from nemotron_jax.sharding import Layout, use_layout

Task = Literal["sft", "kd", "grpo", "prefill", "decode"]
TASKS: tuple[str, ...] = ("sft", "kd", "grpo", "prefill", "decode")
TRAIN_TASKS: tuple[str, ...] = ("sft", "kd", "grpo")


@dataclasses.dataclass
class Program:
    """A lowerable program: `lower()` traces it under its layout on abstract arguments."""

    lower: Callable[[], Any]
    args: tuple  # the abstract arguments (ShapeDtypeStructs with shardings)
    batch_args: Any  # the part of `args` that is data (batch, tokens), not model or optimiser state
    state_args: Any  # the parameters (and optimiser moments): what the planner counts
    model_flops: float  # 6·N·tokens (train) or 2·N·tokens (inference), attention excluded
    recompute: float = 1.0  # executed / model FLOPs from rematerialisation (4/3: the forward twice)


def abstract_params(cfg: ModelConfig, policy: Policy, layout: Layout, quantize: str | None = None,
                    lora: LoRAConfig | None = None) -> tuple[nnx.GraphDef, nnx.State] | tuple[nnx.GraphDef,
                                                                                     nnx.State, nnx.State]:
    """(graphdef, params), every array a sharded ShapeDtypeStruct, of the model a run holds
    (`plan.abstract_run_model`: `quantize`d projections, `lora` adapters). With adapters it is
    (graphdef, adapters, frozen base), split as the train loop splits it."""
    abstract = abstract_run_model(cfg, policy, quantize, lora)
    if lora is not None and lora.rank:
        graphdef, adapters, frozen = nnx.split(abstract, LoRAParam, ...)
        return graphdef, _placed(adapters, layout), _placed(frozen, layout)
    graphdef, state = nnx.split(abstract)
    return graphdef, _placed(state, layout)


def _placed(state: nnx.State, layout: Layout) -> nnx.State:
    """`state` with each array given its sharding from its logical axes (`plan.stored_axes`)."""
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        parts = {part: jax.ShapeDtypeStruct(shape, dtype, sharding=layout.sharding(axes, shape))
                 for part, shape, axes, dtype in stored_axes(path, var)}
        value = value.replace(**parts) if isinstance(value, QArray) else parts[""]
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


def abstract_step(task: Task, cfg: ModelConfig, policy: Policy, layout: Layout, batch: int, seq: int, *,
                  teacher_cfg: ModelConfig | None = None, grad_accum: int = 1, loss_chunk_tokens: int = 4096,
                  cache_len: int | None = None, quantize: str | None = None,
                  lora: LoRAConfig | None = None) -> Program:
    """The program of `task` at global `batch` x `seq` over `layout`.

    sft/kd/grpo: one train step (AdamW state, clipping, donation) on a [batch, seq] batch; kd's
    teacher is `teacher_cfg` (default: the student's config) in the compute dtype. With `lora`
    (rank > 0) the state holds only the adapters and their moments and the (`quantize`d) base is
    the step's frozen argument, as in the train loop. prefill: `seq` prompt tokens per row into a
    cache of `cache_len` (default 2·seq). decode: one engine decode step (the while loop with
    steps=1) against that cache.
    """
    replicated = NamedSharding(layout.mesh, PartitionSpec())
    n_params = cfg.num_params()
    adapted = lora is not None and lora.rank > 0
    if task in TRAIN_TASKS:
        from nemotron_jax.data.batch import PolicyBatch, TokenBatch
        from nemotron_jax.rl.strategies import GRPOStrategy
        from nemotron_jax.train.optim import OptimizerConfig, make_optimizer
        from nemotron_jax.train.state import TrainState, state_shardings_for
        from nemotron_jax.train.step import BATCH_AXES, make_train_step
        from nemotron_jax.train.strategies import KDStrategy, LMStrategy

        graphdef, params, *rest = abstract_params(cfg, policy, layout, quantize, lora)
        frozen = rest[0] if rest else None  # the LoRA base: a non-donated argument, not optimised
        tx, schedule = make_optimizer(OptimizerConfig(grad_accum=grad_accum), 1000)
        shardings = state_shardings_for(params, tx, layout)
        zero = jax.ShapeDtypeStruct((), jnp.int32)
        state = TrainState(step=zero, params=params, opt_state=jax.eval_shape(tx.init, params),  # = init_state's
                           rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)), nonfinite_count=zero,
                           nonfinite_streak=zero)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        row = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=layout.sharding(BATCH_AXES, (batch, seq)))
        frow = jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=row.sharding)
        fields = dict(inputs=row, targets=row, weights=frow, positions=row, segment_ids=row)
        teacher = None
        if task == "grpo":
            strategy: Any = GRPOStrategy(chunk_tokens=loss_chunk_tokens)
            data: Any = PolicyBatch(**fields, old_logprobs=frow, advantages=frow)
        else:
            data = TokenBatch(**fields)
            strategy = LMStrategy(chunk_tokens=loss_chunk_tokens)
            if task == "kd":
                strategy = KDStrategy(chunk_tokens=loss_chunk_tokens)
                t_policy = dataclasses.replace(policy, param_dtype=policy.compute_dtype or policy.param_dtype)
                teacher = abstract_params(teacher_cfg or cfg, t_policy, layout)
        step = make_train_step(strategy, graphdef, tx, schedule, teacher=teacher, layout=layout,
                               state_shardings=shardings, grad_accum=grad_accum, frozen=frozen)
        # 6·N·tokens counts the base's weight gradients, which LoRA does not form: 4·N·tokens there
        flops = (4.0 if adapted else 6.0) * n_params * batch * seq + (
            2.0 * (teacher_cfg or cfg).num_params() * batch * seq if teacher else 0.0)

        def lower_train() -> Any:
            with use_layout(layout):
                return step.lower(state, data)

        extra = tuple(x for x in (None if teacher is None else teacher[1], frozen) if x is not None)
        return Program(lower_train, (state, data, *extra), data,
                       (state.params, state.opt_state, *(() if frozen is None else (frozen,))), flops,
                       4 / 3 if policy.remat != "none" else 1.0)

    from nemotron_jax.sampling.logits_processing import make_params
    from nemotron_jax.sampling.sampler import Flags, Knobs, decode, prefill

    graphdef, *states = abstract_params(cfg, policy, layout, quantize, lora)
    params = states[0] if len(states) == 1 else nnx.merge_state(*states)  # inference: adapters unmerged
    cache_len = cache_len or 2 * seq
    sampling, greedy, truncate = make_params(0.0, 0, 1.0)
    flags = Flags(greedy, truncate, False)
    knobs = Knobs(sampling, jnp.int32(cache_len - seq), jnp.asarray([-1], jnp.int32), jnp.int32(0), None)
    knobs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=replicated), knobs)
    rows = layout.sharding(("batch",), (batch,))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=layout.sharding(("batch", None), (batch, seq)))
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    done = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=rows)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    pre_args = (graphdef, params, tokens, lengths, done, None, key, knobs)
    pre_kw = dict(cache_len=cache_len, cache_dtype=policy.compute_dtype or "bfloat16", flags=flags, layout=layout)
    if task == "prefill":
        return Program(lambda: prefill.lower(*pre_args, **pre_kw), pre_args[1:], (tokens, lengths, done), params,
                       2.0 * n_params * batch * seq)
    if task != "decode":
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    st = decode_state(prefill.eval_shape(*pre_args, **pre_kw), layout)
    steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return Program(lambda: decode.lower(graphdef, params, st, knobs, steps, flags=flags, layout=layout),
                   (params, st, knobs, steps), st, params, 2.0 * n_params * batch)


def decode_state(shapes: Any, layout: Layout) -> Any:
    """The decode state (`sampler.DecodeState`, abstract) placed by `layout`, without compiling
    prefill: each cache array ([B, S, K, H], or a scanned run's [L, B, S, K, H]) as prefill
    constrains it, the per-row arrays split over the batch axes, scalars (the key) replicated. (A
    compiled prefill may leave the [B, S] token buffers replicated instead: B·S·8 bytes per chip.)"""
    from nemotron_jax.sampling.sampler import _CACHE_AXES  # the axes prefill constrains the cache to

    def place(x: jax.ShapeDtypeStruct, axes: tuple) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layout.sharding(axes, x.shape))

    cache = [None if c is None else type(c)(*(place(a, _CACHE_AXES[-a.ndim:]) for a in c)) for c in shapes.cache]
    rest = jax.tree.map(lambda x: place(x, ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()),
                        shapes._replace(cache=None))
    return rest._replace(cache=cache)


def sharded_bytes(tree: Any) -> int:
    """Bytes one device holds of the abstract arrays in `tree` (its largest shard of each)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a typed key: its raw uint32 words
            words = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), x.dtype)).shape
            total += math.prod(shape) * math.prod(words) * 4
        else:
            total += -(-math.prod(shape) * jax.dtypes.itemsize_bits(x.dtype) // 8)  # int4: packed
    return total
