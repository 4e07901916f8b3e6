"""The docs/scale.md table: LN-Nano / Super / Ultra compiled for the smallest TPU slices that fit.

For each row the planner (`nemotron_jax.plan.min_devices`) names the smallest power-of-two chip
count of the generation that fits; that count becomes the smallest slice shape libtpu builds, and
`nemotron-jax compile --json` (one child process per row, `nice -n 10`) compiles the real step
there. The table gives per-chip HBM, fits, FLOPs/step, the MFU ceiling and the compile time, and
whether the planner's total is within 15 % of the compiler's. Run:

    .venv/bin/python benchmarks/compile_scale.py [--rows nano] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GiB = 1024**3
# chips -> the slice shape libtpu builds for that many chips, per generation
SLICES = {
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8"},
}
MODELS = {"nano": "ln-nano-8b", "super": "ln-super-49b", "ultra": "ln-ultra-253b"}
# (label, task, batch, seq, cache_len): SFT rows pack `batch` sequences of `seq` tokens
TASKS = [("SFT 8k", "sft", 8, 8192, None), ("SFT 16k", "sft", 8, 16384, None), ("GRPO update", "grpo", 8, 8192, None),
         ("bf16 inference", "decode", 8, 1024, 16384)]


def smallest_slice(model: str, gen: str, task: str, batch: int, seq: int, cache_len: int | None) -> tuple[int, str]:
    """(chips, shape): the planner's smallest fitting power of two, rounded up to a slice libtpu has."""
    from nemotron_jax.aot.targets import CHIPS
    from nemotron_jax.plan import min_devices
    from nemotron_jax.presets import resolve_config
    from nemotron_jax.sharding import MeshConfig

    train = task in ("sft", "grpo", "kd")
    plan = min_devices(resolve_config(model), CHIPS[gen].memory_bytes, batch, seq if train else cache_len,
                       "train" if train else "infer", MeshConfig(fsdp=-1, rules="fsdp"), attention_impl="pallas",
                       **({"param_dtype": "float32"} if train else {}))  # compile's default on TPU: splash
    need = plan.num_devices if plan else max(SLICES[gen])
    chips = min((c for c in SLICES[gen] if c >= max(need, batch if batch < 4 else 1)), default=max(SLICES[gen]))
    return chips, SLICES[gen][chips]


def compile_row(model: str, gen: str, task: str, batch: int, seq: int, cache_len: int | None,
                timeout: int) -> dict:
    chips, shape = smallest_slice(model, gen, task, batch, seq, cache_len)
    batch = max(batch, chips) if task in ("sft", "grpo") else batch  # the batch must split over fsdp
    mesh = "fsdp=-1" if batch % chips == 0 else f"fsdp={batch},tensor={chips // batch}"
    cmd = ["nice", "-n", "10", sys.executable, "-m", "nemotron_jax", "compile", "--model", model, "--target",
           f"tpu:{gen}:{shape}", "--mesh", mesh, "--task", task, "--batch", str(batch), "--seq", str(seq), "--json"]
    if cache_len:
        cmd += ["--cache-len", str(cache_len)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        return {"target": f"tpu:{gen}:{shape}", "error": f"compile over {timeout} s", "batch": batch}
    if r.returncode:
        return {"target": f"tpu:{gen}:{shape}", "error": r.stderr.strip().splitlines()[-1][:200], "batch": batch}
    out = json.loads(r.stdout)
    out["wall_seconds"], out["batch"] = time.perf_counter() - t0, batch
    return out


def row_markdown(model: str, label: str, r: dict) -> str:
    if "per_device_bytes" not in r:
        return f"| {model} | {label} | {r['target']} | — | — | — | — | — | — | {r['error']} |"
    b = r["per_device_bytes"]
    if not r["fits"] and r.get("required_bytes"):  # the compiler refused it: what it needed is the result
        return (f"| {model} | {label} (B={r['batch']}) | {r['target']} | needs {r['required_bytes'] / GiB:.1f} / "
                f"{r['device_memory_bytes'] / GiB:.0f} | NO (compiler refused) | — | — | "
                f"{r['compile_seconds']:.0f} ({r['compile_cpu_seconds']:.0f} CPU) | "
                f"{r['planner_total_bytes'] / GiB:.1f} | {r['error'][:80]} |")
    plan = r["planner_total_bytes"]
    agree = abs(plan - b["total"]) <= 0.15 * b["total"]
    mfu = "—" if r["mfu_ceiling"] is None else f"{100 * r['mfu_ceiling']:.0f} %"
    return (f"| {model} | {label} (B={r['batch']}) | {r['target']} | {b['total'] / GiB:.1f} / "
            f"{r['device_memory_bytes'] / GiB:.0f} | {'yes' if r['fits'] else 'NO'} | {r['flops'] or 0:.2e} | {mfu} | "
            f"{r['compile_seconds']:.0f} ({r['compile_cpu_seconds']:.0f} CPU) | {plan / GiB:.1f} "
            f"({'agrees' if agree else 'off by more than 15 %'}) | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="nano,super,ultra", help="which models (nano, super, ultra)")
    ap.add_argument("--gens", default="v5e,v5p,v6e")
    ap.add_argument("--tasks", default=",".join(t[0] for t in TASKS))
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per compile")
    args = ap.parse_args()
    print("| model | task | slice | HBM/chip GiB (total / chip) | fits | FLOPs/step/chip | MFU ceiling | "
          "compile s (CPU s) | planner GiB | note |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for key in args.rows.split(","):
        for label, task, batch, seq, cache_len in TASKS:
            if label not in args.tasks.split(","):
                continue
            for gen in args.gens.split(","):
                r = compile_row(MODELS[key], gen, task, batch, seq, cache_len, args.timeout)
                print(row_markdown(MODELS[key], label, r), flush=True)
    print("\nuptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
