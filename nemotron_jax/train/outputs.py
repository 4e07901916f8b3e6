"""A run's output directory: its recorded config, its metrics, its final model.

    {output_dir}/config.yaml           the recipe the run was started (or knowingly resumed) with
    {output_dir}/config_history.jsonl  one line per `resume=force` that changed settings
    {output_dir}/metrics.jsonl         one JSON object per logged step
    {output_dir}/tb/                   TensorBoard events (flushed at every checkpoint)
    {output_dir}/model/                the final model (`nj.load`-able), swapped in whole

Only process 0 writes these files; every process writes its own shards of checkpoints and models.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import yaml

from nemotron_jax.distributed import barrier
from nemotron_jax.errors import ConfigError
from nemotron_jax.fileio import atomic_write_text

# Settings that change how a run is observed or how long it goes on, not what a step computes:
# a resumed run may change them freely (e.g. more `steps` to continue training).
BOOKKEEPING = frozenset({"steps", "progress", "resume", "log_every", "checkpoint_every", "keep_checkpoints",
                         "async_checkpointing", "peak_tflops", "eval_every", "eval_batches", "output_dir"})


def record_config(out: Path, config: dict[str, Any], resume: str, has_run: bool) -> None:
    """Write `config.yaml`, or check it against the run being resumed.

    A run that already holds checkpoints or a model is resumed only with the settings it was
    started with (`resume=auto`); `resume=force` resumes with the new ones and records the change;
    `resume=never` refuses to touch it."""
    path = out / "config.yaml"
    if has_run and resume == "never":
        raise ConfigError(f"{out} already holds a run (resume=never): choose another output_dir")
    if has_run and path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        changed = {k: v for k, v in diff(old, config).items() if k.split(".")[0] not in BOOKKEEPING}
        if changed and resume != "force":
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise ConfigError(f"{out} holds a run started with other settings ({listed}). Pass resume=force to "
                              "continue it with the new settings, or choose another output_dir")
        if changed and jax.process_index() == 0:
            with (out / "config_history.jsonl").open("a") as f:
                f.write(json.dumps({"time": time.time(), "changed": changed}) + "\n")
    if jax.process_index() == 0:
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


def diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new), key=str):
            out.update(diff(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix.rstrip("."): (old, new)}


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
    atomic_write_text(path, "".join(line + "\n" for line in keep))


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

    def flush(self) -> None:
        """Push TensorBoard events to disk: called at every checkpoint, so a killed run keeps its curve."""
        if self.enabled:
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def save_model(model: Any, path: Path) -> None:
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
