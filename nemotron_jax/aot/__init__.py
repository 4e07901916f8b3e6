"""Ahead-of-time compiles for targets this host does not have (`nemotron-jax compile`).

With libtpu installed, XLA compiles for a TPU slice described by its topology alone, so the real
TPU executable of a train step, a prefill or a decode step, with its per-chip memory and cost,
is known on a CPU host. `compile_for` is the whole pipeline: target -> layout -> program ->
compiled report, with the planner's estimate beside it.
"""

from __future__ import annotations

import dataclasses

from nemotron_jax.aot.report import COLLECTIVES, CompileReport, compile_program, count_collectives, format_report
from nemotron_jax.aot.steps import TASKS, Program, abstract_step
from nemotron_jax.aot.targets import CHIPS, Target, parse_target
from nemotron_jax.config import ModelConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.model.transformer import Policy
from nemotron_jax.sharding import MeshConfig

__all__ = ["CHIPS", "COLLECTIVES", "TASKS", "CompileReport", "Program", "Target", "abstract_step", "compile_for",
           "count_collectives", "format_report", "parse_target"]


def compile_for(cfg: ModelConfig, target: str | Target, mesh: MeshConfig, task: str, batch: int, seq: int, *,
                policy: Policy | None = None, cache_len: int | None = None, grad_accum: int = 1,
                loss_chunk_tokens: int = 4096) -> CompileReport:
    """Compile `task` for `target` over `mesh`; `policy` defaults to what `compile` uses: scanned
    layers, full remat and float32 masters with bf16 compute for training, bf16 for inference."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    target = parse_target(target) if isinstance(target, str) else target
    train = task in ("sft", "kd", "grpo")
    policy = policy or Policy(param_dtype="float32" if train else "bfloat16", compute_dtype="bfloat16",
                              scan_layers=True, remat="full" if train else "none")
    try:
        layout = mesh.layout(list(target.devices))
    except ValueError as e:
        raise ConfigError(f"--mesh does not match {target.spec} ({len(target.devices)} devices): {e}") from None
    if batch % layout.batch_shards:
        raise ConfigError(f"--batch {batch} must be a multiple of {layout.batch_shards}, the ways the mesh "
                          f"{dict(layout.mesh.shape)} splits the batch")
    program = abstract_step(task, cfg, policy, layout, batch, seq, grad_accum=grad_accum,  # type: ignore[arg-type]
                            loss_chunk_tokens=loss_chunk_tokens, cache_len=cache_len)
    report = compile_program(program, target, task)
    return dataclasses.replace(report, planner_total_bytes=_planner_total(cfg, mesh, target, task, batch, seq,
                                                                          policy, cache_len, loss_chunk_tokens))


def _planner_total(cfg: ModelConfig, mesh: MeshConfig, target: Target, task: str, batch: int, seq: int,
                   policy: Policy, cache_len: int | None, chunk: int) -> int:
    from nemotron_jax.plan import plan_memory

    train = task in ("sft", "kd", "grpo")
    plan = plan_memory(cfg, mesh, len(target.devices), batch, seq if train else (cache_len or 2 * seq),
                       "train" if train else "infer", remat=policy.remat if train else "full",
                       param_dtype=policy.param_dtype, compute_dtype=policy.compute_dtype or policy.param_dtype,
                       attention_impl="pallas" if policy.attention_impl == "pallas" else "xla",
                       loss_chunk_tokens=chunk)
    return plan.total_bytes
