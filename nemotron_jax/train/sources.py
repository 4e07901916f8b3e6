"""Batch sources: where the one loop's batches come from.

A source hands the loop one host-local batch per step, with metrics about making it, and can
save and restore its position as a small JSON-able dict (checkpointed beside the train state).
It is given the current parameters, so on-policy sources (RL rollouts, online preference pairs)
can sample from the weights being trained; offline sources ignore them.

    PipelineSource   packed rows from the data pipeline (lm, cpt, sft, kd)
    rl.sources       RolloutSource (grpo, rloo), PairSource (dpo offline / online)
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
from flax import nnx

from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.data.pipeline import DataPipeline


class BatchSource(Protocol):
    def next_batch(self, step: int, params: nnx.State) -> tuple[TokenBatch | None, dict[str, float]]:
        """The batch for 1-based `step` (None: nothing to train on this time) and metrics."""
        ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


class PipelineSource:
    """The data pipeline's endless iterator as a source; its state is Grain's iterator state."""

    def __init__(self, pipeline: DataPipeline):
        self.pipeline = pipeline
        self.iterator = pipeline.train_iterator()

    def next_batch(self, step: int, params: nnx.State) -> tuple[TokenBatch, dict[str, float]]:
        batch = next(self.iterator)
        return batch, {"packing_efficiency": DataPipeline.packing_stats(self.iterator).efficiency}

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)


class StepCounter:
    """The state of a source whose batches are pure functions of (seed, step, weights): the step."""

    def __init__(self) -> None:
        self.done = 0

    def get_state(self) -> dict[str, Any]:
        return {"iteration": self.done}

    def set_state(self, state: dict[str, Any]) -> None:
        self.done = int(state.get("iteration", 0))


def host_rows(batch: TokenBatch) -> TokenBatch:
    """This host's contiguous share of a batch every host built whole (rollouts and pairs are
    computed identically everywhere): host p holds global rows [p·B/P, (p+1)·B/P), which is how
    `loop.to_global` lays host-local rows out, so the global batch is the whole batch in order."""
    hosts, me = jax.process_count(), jax.process_index()
    if hosts == 1:
        return batch
    rows = batch.num_rows
    if rows % hosts:
        raise ValueError(f"a batch of {rows} rows does not split over {hosts} hosts")
    share = rows // hosts
    return jax.tree.map(lambda x: x[me * share:(me + 1) * share], batch)
