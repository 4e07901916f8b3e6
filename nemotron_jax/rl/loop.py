"""The loop shared by the on-policy and preference recipes (GRPO, RLOO, DPO/RPO).

    for iteration i:  batch_i = produce(i, current weights)   (rollout + scoring, or a pair batch)
                      K x train_step(state, batch_i)          (the one jitted step, any strategy)
                      log, checkpoint

Each iteration's inputs are functions of (seed, i) and the current weights, and checkpoints hold
the train state with i as their step, so a killed run resumes exactly where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nemotron_jax.model.model import Model
from nemotron_jax.train.checkpoints import IteratorState, RunCheckpoints
from nemotron_jax.train.loop import MetricsWriter, TrainResult, trim_metrics
from nemotron_jax.train.optim import make_optimizer
from nemotron_jax.train.state import TrainState, init_state, state_shardings_for
from nemotron_jax.train.step import make_train_step
from nemotron_jax.train.strategies import Strategy

# produce(iteration, params) -> (host batch or None to skip the update, metrics of producing it)
Producer = Callable[[int, nnx.State], tuple[dict[str, np.ndarray] | None, dict[str, float]]]


def run_policy_loop(recipe: Any, model: Model, strategy: Strategy, produce: Producer,
                    updates_per_iteration: int = 1, reference: Model | None = None,
                    desc: str = "rl") -> TrainResult:
    """Run (or resume) `recipe.steps` iterations; saves `{output_dir}/model`."""
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = model.layout
    graphdef, params = nnx.split(model.module)
    tx, schedule = make_optimizer(recipe.optimizer, recipe.steps * updates_per_iteration)
    teacher = None
    if strategy.needs_teacher:  # the frozen reference policy: a copy of the starting weights
        teacher = nnx.split(reference.module) if reference is not None else (
            graphdef, jax.tree.map(lambda x: x.copy(), params))
    state = init_state(params, tx, recipe.seed, layout)
    del params
    shardings = None if layout is None else state_shardings_for(state.params, tx, layout)
    train_step = make_train_step(strategy, graphdef, tx, schedule, teacher=teacher, layout=layout,
                                 state_shardings=shardings, grad_accum=recipe.optimizer.grad_accum)
    checkpoints = RunCheckpoints(out / "checkpoints", recipe.keep_checkpoints, recipe.async_checkpointing)
    position = IteratorState({"iteration": 0})
    start = checkpoints.latest_step() or 0
    if start:
        state, _ = checkpoints.restore(start, state, position)
        tqdm.write(f"{desc}: resuming after iteration {start} from {checkpoints.directory}")
    primary = jax.process_index() == 0
    if primary:
        trim_metrics(out / "metrics.jsonl", start)
    writer = MetricsWriter(out, primary)
    bar = tqdm(total=recipe.steps, initial=start, desc=desc, dynamic_ncols=True,
               disable=not (recipe.progress and primary))
    last: dict[str, float] = {}
    try:
        for it in range(start + 1, recipe.steps + 1):
            batch, produced = produce(it - 1, state.params)
            last = dict(produced)
            if batch is not None:
                state, update = _update(train_step, state, batch, updates_per_iteration)
                last.update(update)
            if it % recipe.log_every == 0 or it == recipe.steps:
                writer.write(it, last)
            bar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss", "reward_mean", "accuracy") if k in last})
            bar.update(1)
            if it % recipe.checkpoint_every == 0 or it == recipe.steps:
                position.set_state({"iteration": it})
                checkpoints.save(it, state, position.get_state(), {"step": it, "kind": desc})
        checkpoints.wait()
    finally:
        bar.close()
        writer.close()
        checkpoints.close()
    final = Model(nnx.merge(graphdef, state.params), layout)
    model_dir = out / "model"
    if not model_dir.exists():
        final.save(model_dir)
    return TrainResult(state, final, model_dir, start, last, {})


def _update(train_step: Any, state: TrainState, batch: dict[str, np.ndarray],
            updates: int) -> tuple[TrainState, dict[str, float]]:
    start = time.perf_counter()
    device_batch = jax.device_put(batch)
    for _ in range(updates):
        state, metrics = train_step(state, device_batch)
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    seconds = time.perf_counter() - start
    tokens = float((batch["segment_ids"] > 0).sum()) * updates
    out.update(update_s=seconds, update_tokens_per_s=tokens / max(seconds, 1e-9))
    return state, out
