"""The one training loop, for every recipe kind.

    restore or init -> [source.next_batch(step, params) -> K x train_step -> log / eval /
                        checkpoint] x steps -> save model

What varies between kinds is the strategy (the loss) and the batch source (packed data,
rollouts, preference pairs); everything else is here, once: the optimiser and train state,
multi-host global batches, the non-finite guard (skip the update, stop after
`max_nonfinite_steps` in a row with the last good checkpoint intact), metrics.jsonl and
TensorBoard, Orbax checkpoints with the source's position, `config.yaml`, the atomic final save.

Exact resume: a run killed at any moment and restarted with the same command restores the last
checkpoint (weights, optimiser, RNG, counters, source position), drops metrics lines logged
after it, and continues; the same batches then meet the same weights, so the results are
identical.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from nemotron_jax.api import Model
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.lora import LoRAConfig, add_adapters, has_adapters, merge, save_peft
from nemotron_jax.model.lora import LoRAParam
from nemotron_jax.sharding import Layout
from nemotron_jax.train.checkpoints import RunCheckpoints
from nemotron_jax.train.config import RunConfig, recipe_to_dict
from nemotron_jax.train.optim import make_optimizer
from nemotron_jax.train.outputs import MetricsWriter, record_config, save_model, trim_metrics
from nemotron_jax.train.sources import BatchSource
from nemotron_jax.train.state import TrainState, init_state, state_shardings_for
from nemotron_jax.train.step import BATCH_AXES, make_eval_step, make_train_step
from nemotron_jax.train.strategies import Strategy


class TrainingError(ValueError):
    """Training cannot go on (e.g. repeated non-finite steps); the message says what to change."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    model: Model
    model_dir: Path
    start_step: int
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def run(recipe: RunConfig, model: Model, strategy: Strategy, source: BatchSource, *,
        teacher: Model | None = None, updates_per_batch: int = 1,
        eval_batches: Sequence[TokenBatch] = ()) -> TrainResult:
    """Run (or resume) `recipe.steps` steps of `strategy` on batches from `source`.

    Each batch gets `updates_per_batch` updates (GRPO's K); `teacher` is the frozen model the
    strategy compares against (KD teacher, RL reference policy); `eval_batches` are held-out
    batches evaluated every `eval_every` steps and at the end."""
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    checkpoints = RunCheckpoints(out / "checkpoints", recipe.keep_checkpoints, recipe.async_checkpointing)
    start = checkpoints.latest_step() or 0
    record_config(out, recipe_to_dict(recipe), recipe.resume, has_run=bool(start) or (out / "model").is_dir())
    layout = model.layout
    ensure_adapters(model, recipe.lora, recipe.seed)
    lora = has_adapters(model.module)
    if lora:  # only the adapters train; the base is one frozen, non-donated argument of the step
        graphdef, params, frozen = nnx.split(model.module, LoRAParam, ...)
    else:
        (graphdef, params), frozen = nnx.split(model.module), None
    tx, schedule = make_optimizer(recipe.optimizer, recipe.steps * updates_per_batch)
    state = init_state(params, tx, recipe.seed, layout)
    del params
    if start:
        state, source_state, _ = checkpoints.restore(start, state)
        source.set_state(source_state)
        log(f"resuming from checkpoint step {start} in {checkpoints.directory}")
    if primary:
        trim_metrics(out / "metrics.jsonl", start)
    teacher_split = None if teacher is None else nnx.split(teacher.module)
    shardings = None if layout is None else state_shardings_for(state.params, tx, layout)
    train_step = make_train_step(strategy, graphdef, tx, schedule, teacher=teacher_split, layout=layout,
                                 state_shardings=shardings, grad_accum=recipe.optimizer.grad_accum, frozen=frozen)
    eval_step = (make_eval_step(strategy, graphdef, teacher=teacher_split, layout=layout, frozen=frozen)
                 if eval_batches else None)
    policy = (lambda p: p) if frozen is None else (lambda p: nnx.merge_state(p, frozen))  # the whole policy
    meter = Throughput(model, teacher, recipe.peak_tflops)
    writer = MetricsWriter(out, primary)
    bar = tqdm(total=recipe.steps, initial=start, desc=recipe.kind, dynamic_ncols=True, file=sys.stderr,
               disable=not (recipe.progress and primary))
    last: dict[str, float] = {}
    evals: dict[str, float] = {}
    pending: tuple[int, Any] | None = None  # (step, metrics) not yet checked for non-finite
    try:
        for step in range(start + 1, recipe.steps + 1):
            made = time.perf_counter()
            batch, produced = source.next_batch(step, policy(state.params))
            meter.source_seconds += time.perf_counter() - made
            metrics = None
            if batch is not None:
                meter.count(batch, updates_per_batch)
                global_batch = to_global(batch, layout)
                for _ in range(updates_per_batch):
                    state, metrics = train_step(state, global_batch)
                if pending is not None:  # one step behind, so the host never waits on the step it just queued
                    _check_finite(*pending, recipe, checkpoints)
                pending = (step, metrics)
            if step % recipe.log_every == 0 or step == recipe.steps:
                updated = {} if metrics is None else {k: float(v) for k, v in jax.device_get(metrics).items()}
                last = {**produced, **updated, **meter.window()}
                writer.write(step, last)
                bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "reward_mean", "accuracy", "tokens_per_s")
                                 if k in last})
            if eval_step is not None and ((recipe.eval_every and step % recipe.eval_every == 0)
                                          or step == recipe.steps):
                evals = evaluate(eval_step, state.params, eval_batches, layout)
                writer.write(step, evals)
            if step % recipe.checkpoint_every == 0 or step == recipe.steps:
                if pending is not None:
                    _check_finite(*pending, recipe, checkpoints)
                    pending = None
                writer.flush()  # before the checkpoint exists, so a resume never lacks the curve up to it
                checkpoints.save(step, state, source.get_state(), {"step": step, "kind": recipe.kind,
                                                                   "time": time.time()})
            bar.update(1)
        if pending is not None:
            _check_finite(*pending, recipe, checkpoints)
        checkpoints.wait()
    finally:
        bar.close()
        writer.close()
        checkpoints.close()
    final = Model(nnx.merge(graphdef, policy(state.params)), layout)
    model_dir = out / "model"
    if not model_dir.exists() or start < recipe.steps:
        if lora:  # model/ stays a plain model for the next stage; the adapters alone in PEFT's format
            save_peft(final.module, out / "adapter", base_model=recipe.model.source)
        save_model(Model(merge(final.module), layout) if lora else final, model_dir)
    log(f"done: {recipe.steps} steps; model saved to {model_dir}" if start < recipe.steps else
        f"already complete: checkpoint step {start} >= steps={recipe.steps}; model in {model_dir}")
    return TrainResult(state, final, model_dir, start, last, evals)


def ensure_adapters(model: Model, cfg: LoRAConfig, seed: int) -> None:
    """Add the recipe's adapters (`lora.rank` > 0) to `model` in place, unless it has some already
    (an RL recipe adds them before building its reference view and batch source)."""
    if cfg.rank > 0 and not has_adapters(model.module):
        added = add_adapters(model.module, cfg, seed, model.layout)
        log(f"lora: rank {cfg.rank} adapters on {added} projections ({', '.join(cfg.targets)})")


def to_global(batch: TokenBatch, layout: Layout | None) -> TokenBatch:
    """Host-local rows -> one global array per field, sharded over the batch axes (every host
    contributes its rows; with one process this is a plain transfer)."""
    if layout is None:
        return jax.device_put(batch)

    def one(rows: Any) -> jax.Array:
        shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
        return jax.make_array_from_process_local_data(layout.sharding(BATCH_AXES, shape), rows, shape)

    return jax.tree.map(one, batch)


def evaluate(eval_step: Any, params: nnx.State, batches: Sequence[TokenBatch],
             layout: Layout | None) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in jax.device_get(eval_step(params, to_global(batch, layout))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    weight = max(totals.pop("weight", 0.0), 1.0)
    return {f"eval_{k}": v / weight for k, v in totals.items()}


class Throughput:
    """Tokens/s and MFU over the steps since the last log line; `update_*` excludes the time spent
    making batches (rollouts, scoring)."""

    def __init__(self, model: Model, teacher: Model | None, peak_tflops: float):
        self.flops_per_slot = flops_per_token(model, teacher)
        self.peak = peak_tflops * 1e12 * jax.device_count()
        self._reset()

    def _reset(self) -> None:
        self.started, self.source_seconds = time.perf_counter(), 0.0
        self.tokens = self.slots = self.steps = 0

    def count(self, batch: TokenBatch, updates: int) -> None:
        hosts = jax.process_count()
        self.tokens += batch.real_tokens() * hosts * updates
        self.slots += batch.segment_ids.size * hosts * updates
        self.steps += 1

    def window(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        updating = max(elapsed - self.source_seconds, 1e-9)
        out = {"tokens_per_s": self.tokens / elapsed, "update_tokens_per_s": self.tokens / updating,
               "update_s": updating / max(self.steps, 1)}
        if self.peak:
            out["mfu"] = self.flops_per_slot * self.slots / elapsed / self.peak
        self._reset()
        return out


def flops_per_token(model: Model, teacher: Model | None) -> float:
    """6·N per trained token (forward + backward), + 2·N per token for a teacher forward; N
    excludes the input embedding table (a lookup, not a matmul) unless it doubles as the head."""
    def matmul_params(m: Model) -> int:
        c = m.config
        return c.num_params() - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)

    return 6.0 * matmul_params(model) + (2.0 * matmul_params(teacher) if teacher is not None else 0.0)


def _check_finite(step: int, metrics: Any, recipe: RunConfig, checkpoints: RunCheckpoints) -> None:
    streak = int(jax.device_get(metrics["nonfinite_streak"]))
    if streak >= recipe.max_nonfinite_steps:
        checkpoints.wait()
        latest = checkpoints.latest_step()
        where = (f"the last good checkpoint, step {latest}, is intact in {checkpoints.directory}"
                 if latest else "no checkpoint was written")
        raise TrainingError(
            f"stopping at step {step}: {streak} consecutive non-finite steps (loss, gradients or updated "
            f"weights were NaN/inf; those updates were skipped); {where}. Lower optimizer.lr, tighten "
            f"optimizer.clip_norm, or check the data")


__all__ = ["TrainResult", "TrainingError", "ensure_adapters", "evaluate", "run", "save_model", "to_global"]
