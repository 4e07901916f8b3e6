"""Ahead-of-time compiles for targets this host does not have (`nemotron-jax compile`).

With libtpu installed, XLA compiles for a TPU slice described by its topology alone, so the real
TPU executable of a train step, a prefill or a decode step, with its per-chip memory and cost,
is known on a CPU host. `compile_for` is the whole pipeline: target -> layout -> program ->
compiled report, with the planner's estimate beside it.
"""

from __future__ import annotations

import dataclasses

from nemotron_jax.aot.report import COLLECTIVES, CompileReport, compile_program, count_collectives, format_report
from nemotron_jax.aot.steps import TASKS, TRAIN_TASKS, Program, abstract_step
from nemotron_jax.aot.targets import CHIPS, Target, parse_target
from nemotron_jax.config import ModelConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.kernels import target_platform
from nemotron_jax.lora import LoRAConfig
from nemotron_jax.model.transformer import Policy
from nemotron_jax.plan import MemoryPlan, plan_memory
from nemotron_jax.sharding import MeshConfig

__all__ = ["CHIPS", "COLLECTIVES", "TASKS", "TRAIN_TASKS", "CompileReport", "Program", "Target", "abstract_step",
           "compile_for", "count_collectives", "default_policy", "format_report", "parse_target", "resolve_attention"]


def default_policy(task: str, platform: str, lora_rank: int = 0) -> Policy:
    """What `compile` compiles unless told otherwise: scanned layers; training with full remat and
    float32 masters (a LoRA base: bf16, it is frozen), inference in bf16; bf16 compute; attention
    as a run on `platform` would do it (`resolve_attention`)."""
    train = task in TRAIN_TASKS
    return Policy(param_dtype="float32" if train and not lora_rank else "bfloat16", compute_dtype="bfloat16",
                  scan_layers=True, remat="full" if train else "none", attention_impl=resolve_attention("auto",
                                                                                                  platform))


def resolve_attention(impl: str, platform: str) -> str:
    """`auto`: the kernels (`pallas`: splash attention where it applies) on TPU and GPU, plain XLA
    attention on CPU (where the kernels only run in interpret mode); xla / pallas as given."""
    if impl == "auto":
        return "xla" if platform == "cpu" else "pallas"
    return impl


def compile_for(cfg: ModelConfig, target: str | Target, mesh: MeshConfig, task: str, batch: int, seq: int, *,
                policy: Policy | None = None, cache_len: int | None = None, grad_accum: int = 1,
                loss_chunk_tokens: int = 4096, quantize: str | None = None,
                lora: LoRAConfig | None = None) -> CompileReport:
    """Compile `task` for `target` over `mesh`; `policy` defaults to `default_policy`. Kernels are
    chosen for the target's platform, not this host's; `attention_impl="auto"` is resolved for it.
    `quantize` (int8 | int4) quantizes the projections: the weights of inference, the frozen base
    of training, which then needs `lora` (QLoRA); `lora` (rank > 0) trains adapters only."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    train = task in TRAIN_TASKS
    rank = lora.rank if lora is not None else 0
    if lora is not None:
        lora.validate()
    if quantize is not None and quantize not in ("int8", "int4"):
        raise ConfigError(f"--quantize {quantize!r}: expected int8 or int4")
    if quantize and train and not rank:
        raise ConfigError(f"--quantize {quantize} freezes the base: training (--task {task}) needs --lora RANK (QLoRA)")
    target = parse_target(target) if isinstance(target, str) else target
    policy = policy or default_policy(task, target.platform, rank)
    policy = dataclasses.replace(policy, attention_impl=resolve_attention(policy.attention_impl, target.platform))
    try:
        layout = mesh.layout(list(target.devices))
    except ValueError as e:
        raise ConfigError(f"--mesh does not match {target.spec} ({len(target.devices)} devices): {e}") from None
    if batch % layout.batch_shards:
        raise ConfigError(f"--batch {batch} must be a multiple of {layout.batch_shards}, the ways the mesh "
                          f"{dict(layout.mesh.shape)} splits the batch")
    with target_platform(target.platform):
        program = abstract_step(task, cfg, policy, layout, batch, seq, grad_accum=grad_accum,  # type: ignore[arg-type]
                                loss_chunk_tokens=loss_chunk_tokens, cache_len=cache_len, quantize=quantize,
                                lora=lora if rank else None)
        report = compile_program(program, target, task)
    plan = _plan(cfg, mesh, target, task, batch, seq, policy, cache_len, loss_chunk_tokens, quantize, lora)
    return dataclasses.replace(report, planner_total_bytes=plan.total_bytes,
                               planner_state_bytes=plan.params_bytes + plan.optimizer_bytes,
                               attention_impl=policy.attention_impl, quantize=quantize, lora_rank=rank)


def _plan(cfg: ModelConfig, mesh: MeshConfig, target: Target, task: str, batch: int, seq: int,
                   policy: Policy, cache_len: int | None, chunk: int, quantize: str | None,
                   lora: LoRAConfig | None) -> MemoryPlan:
    train = task in TRAIN_TASKS
    plan = plan_memory(cfg, mesh, len(target.devices), batch, seq if train else (cache_len or 2 * seq),
                       "train" if train else "infer", remat=policy.remat if train else "full",
                       param_dtype=policy.param_dtype, compute_dtype=policy.compute_dtype or policy.param_dtype,
                       attention_impl="pallas" if policy.attention_impl == "pallas" else "xla",
                       loss_chunk_tokens=chunk, quantize=quantize, lora_rank=lora.rank if lora else 0,
                       lora_targets=lora.targets if lora else LoRAConfig.targets, scan_layers=policy.scan_layers)
    return plan
