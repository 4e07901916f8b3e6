"""The one training loop, shared by every recipe kind.

    restore or init -> [next batch -> train_step -> log / eval / checkpoint] x steps -> save model

Outputs under `output_dir`: `metrics.jsonl` (one JSON object per logged step: step, loss,
grad_norm, lr, tokens_per_s, mfu, ...; eval lines carry eval_* keys), TensorBoard events in
`tb/`, Orbax checkpoints in `checkpoints/`, and the final model in `model/` (`nj.load`-able).

Exact resume: a run killed at any moment and restarted with the same command restores the last
checkpoint (weights, optimiser, RNG, counters, data position), drops metrics lines logged after
it, and continues; the same batches then meet the same weights, so the results are identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from nemotron_jax.data.pipeline import DataPipeline
from nemotron_jax.distributed import barrier
from nemotron_jax.model.model import Model
from nemotron_jax.sharding import Layout
from nemotron_jax.train.checkpoints import RunCheckpoints
from nemotron_jax.train.config import Recipe, dump_recipe
from nemotron_jax.train.optim import make_optimizer
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


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _flops_per_token(model: Model, teacher: Model | None) -> float:
    """6·N per trained token (forward + backward), + 2·N per token for a teacher forward; N
    excludes the input embedding table (a lookup, not a matmul) unless it doubles as the head."""
    def matmul_params(m: Model) -> int:
        c = m.config
        return c.num_params() - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)

    return 6.0 * matmul_params(model) + (2.0 * matmul_params(teacher) if teacher is not None else 0.0)


def _to_global(batch: dict[str, np.ndarray], layout: Layout | None) -> dict[str, jax.Array]:
    """Host-local rows -> one global array per field, sharded over the batch axes."""
    if layout is None:
        return jax.device_put(batch)
    out = {}
    for k, v in batch.items():
        shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(layout.sharding(BATCH_AXES, shape), v, shape)
    return out


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep only complete lines logged at or before `last_step` (the checkpoint being resumed)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", math.inf) <= last_step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


class MetricsWriter:
    """metrics.jsonl and TensorBoard, written by process 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = (out / "metrics.jsonl").open("a") if enabled else None
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if math.isfinite(v):  # a NaN step is in metrics.jsonl; TensorBoard would only warn about it
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _evaluate(eval_step: Any, params: nnx.State, batches: list[dict[str, np.ndarray]],
              layout: Layout | None) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in jax.device_get(eval_step(params, _to_global(batch, layout))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    weight = max(totals.pop("weight", 0.0), 1.0)
    return {f"eval_{k}": v / weight for k, v in totals.items()}


def train(recipe: Recipe, model: Model, strategy: Strategy, pipeline: DataPipeline,
          teacher: Model | None = None) -> TrainResult:
    """Run (or resume) `recipe` on `model`; returns the final state and the saved model."""
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        dump_recipe(recipe, out / "config.yaml")
    for message in pipeline.messages:
        _log(f"data: {message}")
    layout = model.layout
    graphdef, params = nnx.split(model.module)
    tx, schedule = make_optimizer(recipe.optimizer, recipe.steps)
    state = init_state(params, tx, recipe.seed, layout)
    del params
    checkpoints = RunCheckpoints(out / "checkpoints", recipe.keep_checkpoints, recipe.async_checkpointing)
    iterator = pipeline.train_iterator()
    start = checkpoints.latest_step() or 0
    if start:
        state, _ = checkpoints.restore(start, state, iterator)
        _log(f"resuming from checkpoint step {start} in {checkpoints.directory}")
    if primary:
        trim_metrics(out / "metrics.jsonl", start)
    teacher_split = None if teacher is None else nnx.split(teacher.module)
    shardings = None if layout is None else state_shardings_for(state.params, tx, layout)
    train_step = make_train_step(strategy, graphdef, tx, schedule, teacher=teacher_split, layout=layout,
                                 state_shardings=shardings, grad_accum=recipe.optimizer.grad_accum)
    eval_step = make_eval_step(strategy, graphdef, teacher=teacher_split, layout=layout)
    eval_batches = pipeline.eval_batches(recipe.eval_batches)
    flops_per_token = _flops_per_token(model, teacher)
    peak = recipe.peak_tflops * 1e12 * jax.device_count()
    writers = MetricsWriter(out, primary)
    bar = tqdm(total=recipe.steps, initial=start, desc=recipe.kind, dynamic_ncols=True, file=sys.stderr,
               disable=not (recipe.progress and primary))
    last: dict[str, float] = {}
    evals: dict[str, float] = {}
    pending: tuple[int, Any] | None = None  # (step, metrics) not yet checked for non-finite
    window_start, window_tokens, window_slots = time.perf_counter(), 0, 0
    try:
        for step in range(start + 1, recipe.steps + 1):
            batch = next(iterator)
            window_tokens += int((batch["segment_ids"] > 0).sum()) * jax.process_count()
            window_slots += batch["segment_ids"].size * jax.process_count()
            state, metrics = train_step(state, _to_global(batch, layout))
            if pending is not None:  # one step behind, so the host never waits on the step it just queued
                _check_finite(*pending, recipe, checkpoints)
            pending = (step, metrics)
            if step % recipe.log_every == 0 or step == recipe.steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                last["tokens_per_s"] = window_tokens / elapsed
                if peak:
                    last["mfu"] = flops_per_token * window_slots / elapsed / peak
                last["packing_efficiency"] = DataPipeline.packing_stats(iterator).efficiency
                writers.write(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.3g}",
                                **({"mfu": f"{last['mfu']:.1%}"} if peak else {}))
                window_start, window_tokens, window_slots = time.perf_counter(), 0, 0
            if eval_batches and ((recipe.eval_every and step % recipe.eval_every == 0) or step == recipe.steps):
                evals = _evaluate(eval_step, state.params, eval_batches, layout)
                writers.write(step, evals)
            if step % recipe.checkpoint_every == 0 or step == recipe.steps:
                _check_finite(*pending, recipe, checkpoints)
                pending = None
                checkpoints.save(step, state, iterator.get_state(),
                                 {"step": step, "kind": recipe.kind, "time": time.time()})
            bar.update(1)
        if pending is not None:
            _check_finite(*pending, recipe, checkpoints)
        checkpoints.wait()
    finally:
        bar.close()
        writers.close()
        checkpoints.close()
    final = Model(nnx.merge(graphdef, state.params), layout)
    model_dir = out / "model"
    if not model_dir.exists() or start < recipe.steps:
        _save_model(final, model_dir)
    _log(f"done: {recipe.steps} steps; model saved to {model_dir}" if start < recipe.steps else
         f"already complete: checkpoint step {start} >= steps={recipe.steps}; model in {model_dir}")
    return TrainResult(state, final, model_dir, start, last, evals)


def _save_model(model: Model, path: Path) -> None:
    """Save beside `path`, then swap it in, so an interrupted save never loses the previous model."""
    staging = path.with_name(f".{path.name}.new")
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(staging, ignore_errors=True)
    model.save(staging)  # every process writes its shards (synchronised inside)
    if primary:
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
    barrier(f"saved {path}")


def _check_finite(step: int, metrics: Any, recipe: Recipe, checkpoints: RunCheckpoints) -> None:
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
