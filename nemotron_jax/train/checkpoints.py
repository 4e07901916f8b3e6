"""Orbax checkpoints of a run: train state, per-host data-iterator state and bookkeeping.

Each checkpoint `{output_dir}/checkpoints/<step>/` holds `state` (params, optimiser state, RNG,
counters; each host writes its shards), `data` (one JSON per host, via Grain's handler) and
`meta` (JSON). Orbax writes to a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest; saves are asynchronous (the arrays
are copied off the device before `save` returns, so training may donate them right after).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from nemotron_jax.train.state import abstract_state


class IteratorState(grain.DatasetIterator):
    """An iterator stand-in holding a state snapshot, so an async save sees the state at save time."""

    def __init__(self, state: dict[str, Any]):
        super().__init__()
        self._state = state

    def __next__(self) -> Any:
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        self._state = state


class RunCheckpoints:
    """The checkpoints of one run (every kind, and Puzzle's BLD): keep-N, async, atomic."""

    def __init__(self, directory: str | Path, keep: int = 2, use_async: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(IteratorState(data_state)),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state, data state, meta) of checkpoint `step`; the state in the shardings of `like`
        (any pytree of arrays: a `TrainState`, or BLD's per-layer trainables and moments)."""
        data = IteratorState({})
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state(like)),
            data=grain.checkpoint.CheckpointRestore(data),
            meta=ocp.args.JsonRestore()))
        return out.state, data.get_state(), dict(out.meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
