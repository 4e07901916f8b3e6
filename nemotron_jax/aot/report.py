"""Compile a `Program` for a target and read what XLA says about it: memory, cost, collectives.

Memory is per chip (`memory_analysis()` of the SPMD-partitioned executable), FLOPs and bytes
accessed are per chip too (`cost_analysis()` of the partitioned module). The roofline bound on a
step is max(FLOPs / peak, bytes / HBM bandwidth); the MFU ceiling is the model FLOPs (6·N·tokens
for training) one chip must do, over peak times that bound. XLA counts a while loop's body once:
with scanned layers `flops` and `bytes_accessed` cover one layer of each scanned run, so the
compute bound uses the model's FLOPs (times 4/3 under remat) when they are larger. A program the compiler refuses for
lack of memory is a result (`fits: false`, with the bytes known), not an error.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax

from nemotron_jax.aot.steps import Program, sharded_bytes
from nemotron_jax.aot.targets import Target

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"(?<![\w-])(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")  # not -done
_OOM_RE = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds .*memory|Ran out of memory")
_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
# libtpu: "the total memory required for HLO temporaries (20.14G) exceeds available HBM (15.75G)",
# or "Used 125.7G of 95.74G hbm"
_NEEDED_RE = re.compile(r"required for [^(]*\(" + _SIZE + r"\)|Used " + _SIZE + r" of")


@dataclasses.dataclass
class CompileReport:
    target: str
    devices: int
    task: str
    per_device_bytes: dict[str, int]  # arguments, temporaries, outputs, aliased, total
    device_memory_bytes: int
    fits: bool
    flops: float | None  # per chip, from XLA (a scanned loop's body counted once)
    bytes_accessed: float | None  # per chip, from XLA (likewise)
    compile_seconds: float
    planner_total_bytes: int | None = None
    planner_state_bytes: int | None = None  # the planner's parameters + optimiser: equals state_bytes
    compile_cpu_seconds: float = 0.0  # CPU time of lowering + compiling (all threads): load-independent
    model_flops: float = 0.0  # per chip
    step_seconds_lower_bound: float | None = None
    mfu_ceiling: float | None = None
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)
    kernel_calls: int = 0  # Mosaic (Pallas TPU) custom calls in the compiled HLO: 0 means no kernel ran
    batch_bytes: int = 0  # per chip: the data part of the arguments
    state_bytes: int = 0  # per chip: parameters + optimiser moments (scalar counters excluded)
    error: str | None = None  # the compiler's reason when it refused the program
    required_bytes: int | None = None  # per chip, what the refused program needed (from the compiler's message)
    attention_impl: str | None = None  # as resolved for the target (xla | pallas)
    quantize: str | None = None
    lora_rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compile_program(program: Program, target: Target, task: str) -> CompileReport:
    """Lower and compile `program`; a memory refusal comes back as `fits=False`."""
    n = len(target.devices)
    batch_bytes = sharded_bytes(program.batch_args)
    state_bytes = sum(sharded_bytes(a) for a in jax.tree.leaves(program.state_args, is_leaf=_is_sds) if a.ndim)
    arguments = sum(sharded_bytes(a) for a in jax.tree.leaves(program.args, is_leaf=_is_sds))
    t0, cpu0 = time.perf_counter(), time.process_time()
    error, compiled, required = None, None, None
    try:
        compiled = program.lower().compile()
    except Exception as e:  # XLA raises JaxRuntimeError (XlaRuntimeError before 0.4.36) for OOM
        if not _OOM_RE.search(str(e)):
            raise
        error = str(e).strip().splitlines()[0][:500]
        required = needed_bytes(str(e))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    mem = {"arguments": arguments, "temporaries": 0, "outputs": 0, "aliased": 0}
    flops = accessed = None
    collectives: dict[str, int] = {}
    kernel_calls = 0
    if compiled is not None:
        m = compiled.memory_analysis()
        mem = {"arguments": int(m.argument_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
               "outputs": int(m.output_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost  # a list of one dict before JAX 0.4.30
        flops, accessed = cost.get("flops"), cost.get("bytes accessed")
        hlo = compiled.as_text()
        collectives = count_collectives(hlo)
        kernel_calls = hlo.count('custom_call_target="tpu_custom_call"')
    mem["total"] = mem["arguments"] + mem["temporaries"] + mem["outputs"] - mem["aliased"]
    chip = target.chip
    fits = error is None and mem["total"] <= chip.memory_bytes
    bound = mfu = None
    model_flops = program.model_flops / n
    if flops is not None and chip.peak_flops and chip.hbm_bandwidth:
        # XLA's cost analysis counts a while-loop body once, so with scanned layers its FLOPs are
        # those of one layer per run: the compute bound takes the larger of it and the model's
        executed = max(flops, model_flops * program.recompute)
        bound = max(executed / chip.peak_flops, (accessed or 0.0) / chip.hbm_bandwidth)
        mfu = model_flops / (bound * chip.peak_flops) if bound > 0 else None
    return CompileReport(target.spec, n, task, mem, chip.memory_bytes, fits, flops, accessed, seconds,
                         compile_cpu_seconds=cpu_seconds, model_flops=model_flops, step_seconds_lower_bound=bound,
                         mfu_ceiling=mfu, kernel_calls=kernel_calls,
                         collectives=collectives, batch_bytes=batch_bytes, state_bytes=state_bytes, error=error,
                         required_bytes=required)


def needed_bytes(message: str) -> int | None:
    """The bytes per chip an out-of-memory message says the program needed (None if it says none)."""
    m = _NEEDED_RE.search(message)
    if m is None:
        return None
    number, unit = m.group(1) or m.group(3), m.group(2) if m.group(1) else m.group(4)
    return int(float(number) * 1024 ** "_KMGTP".index(unit or "_"))


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective the compiled HLO holds (static count: a scanned body counts once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in _COLLECTIVE_RE.finditer(hlo_text):
        counts[m.group(1)] += 1
    return counts


def _is_sds(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def format_report(r: CompileReport) -> str:
    gib = 1024**3
    b = r.per_device_bytes
    options = ", ".join(x for x in (f"attention {r.attention_impl}" if r.attention_impl else "",
                                     f"{r.quantize} weights" if r.quantize else "",
                                     f"LoRA rank {r.lora_rank}" if r.lora_rank else "") if x)
    lines = [f"{r.task} on {r.target} ({r.devices} devices{', ' + options if options else ''}), compiled in "
             f"{r.compile_seconds:.1f} s ({r.compile_cpu_seconds:.1f} s CPU)",
             *(f"  {k:<12} {b[k] / gib:9.3f} GiB per chip" for k in ("arguments", "temporaries", "outputs",
                                                                      "aliased", "total")),
             f"  chip memory  {r.device_memory_bytes / gib:9.3f} GiB: {'fits' if r.fits else 'does NOT fit'}"]
    if r.error:
        if r.required_bytes:
            lines.append(f"  compiler needs {r.required_bytes / gib:9.3f} GiB per chip")
        lines.append(f"  compiler: {r.error}")
    if r.planner_total_bytes is not None:
        lines.append(f"  planner      {r.planner_total_bytes / gib:9.3f} GiB per chip (nemotron-jax plan)")
    if r.planner_state_bytes is not None:
        lines.append(f"  params+opt   {r.state_bytes / gib:9.3f} GiB per chip compiled, "
                     f"{r.planner_state_bytes / gib:.3f} planned")
    if r.flops is not None:
        lines.append(f"  FLOPs {r.flops:.3e} per chip, bytes accessed {r.bytes_accessed or 0:.3e} per chip")
    if r.step_seconds_lower_bound is not None:
        lines.append(f"  step >= {r.step_seconds_lower_bound * 1e3:.2f} ms (roofline); MFU ceiling "
                     f"{100 * (r.mfu_ceiling or 0):.1f} %")
    if r.collectives:
        lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in r.collectives.items())
                     + (f"; Mosaic kernel calls {r.kernel_calls}" if r.kernel_calls else ""))
    return "\n".join(lines)
