"""Multi-host start-up: `jax.distributed.initialize` from config or the environment.

On TPU pods, SLURM and other clusters JAX detects everything itself (`auto`); elsewhere (and in
the two-process CPU tests) the coordinator address, process count and index come from the recipe
or from `NEMOTRON_JAX_COORDINATOR`, `NEMOTRON_JAX_NUM_PROCESSES`, `NEMOTRON_JAX_PROCESS_ID`.
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    enabled: bool | None = None  # None: initialise when the environment asks for it
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def from_environment(cfg: DistributedConfig = DistributedConfig()) -> DistributedConfig:
    """Fill unset fields from NEMOTRON_JAX_* variables."""
    env = os.environ
    address = cfg.coordinator_address or env.get("NEMOTRON_JAX_COORDINATOR")
    count = cfg.num_processes or _int_env("NEMOTRON_JAX_NUM_PROCESSES")
    index = cfg.process_id if cfg.process_id is not None else _int_env("NEMOTRON_JAX_PROCESS_ID")
    enabled = cfg.enabled if cfg.enabled is not None else address is not None
    return DistributedConfig(enabled, address, count, index)


def initialize(cfg: DistributedConfig = DistributedConfig()) -> None:
    """Join the job's processes once (a no-op for single-process runs or when already joined)."""
    cfg = from_environment(cfg)
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    # CPU devices need a collectives backend to talk across processes; accelerators ignore this.
    # (Asking jax.default_backend() here would start the backends before the job is joined.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)


def barrier(name: str) -> None:
    """Wait until every process of the job reaches `name` (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None
