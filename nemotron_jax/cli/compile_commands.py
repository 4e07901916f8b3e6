"""`compile`: AOT-compile a run's step for a target this host does not have (e.g. a TPU slice)."""

from __future__ import annotations

import argparse
import json
import os

from nemotron_jax.aot.steps import TASKS
from nemotron_jax.cli.plan_commands import parse_mesh


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a train/inference step for a TPU slice or CPU mesh; "
                       "report per-chip memory, FLOPs, collectives")
    p.add_argument("--model", required=True, help="preset name, config.json, HF dir or saved model")
    p.add_argument("--target", required=True, help="tpu:GEN:AxB[xC] (v4, v5e, v5p, v6e) or cpu:N")
    p.add_argument("--mesh", default="fsdp=-1", help="axis sizes, e.g. fsdp=-1,tensor=4 (-1: the rest)")
    p.add_argument("--rules", default=None, help="dp | fsdp | fsdp_tp (default: fsdp_tp if tensor > 1 else fsdp)")
    p.add_argument("--task", choices=TASKS, default="sft")
    p.add_argument("--batch", type=int, required=True, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, required=True, help="sequence length (train) or prompt length (infer)")
    p.add_argument("--cache-len", type=int, default=None, help="prefill/decode: KV-cache length (default 2*seq)")
    p.add_argument("--remat", default=None, help="jax.checkpoint policy (default: full for training, none else)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype (default: float32 for training, bfloat16 for inference)")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--attention-impl", choices=["xla", "pallas"], default="xla")
    p.add_argument("--no-scan", action="store_true", help="unroll the layers (slow compiles of deep stacks)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=compile_command)


def compile_command(args: argparse.Namespace) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling needs no accelerator: never grab one
    from nemotron_jax.aot import compile_for, format_report
    from nemotron_jax.model.transformer import Policy
    from nemotron_jax.presets import resolve_config

    cfg = resolve_config(args.model)
    mesh = parse_mesh(args.mesh, args.rules)
    train = args.task in ("sft", "kd", "grpo")
    for name in ("batch", "seq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    policy = Policy(param_dtype=args.dtype or ("float32" if train else "bfloat16"), compute_dtype=args.compute_dtype,
                    scan_layers=not args.no_scan, remat=args.remat or ("full" if train else "none"),
                    attention_impl=args.attention_impl)
    report = compile_for(cfg, args.target, mesh, args.task, args.batch, args.seq, policy=policy,
                         cache_len=args.cache_len, grad_accum=args.grad_accum)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
