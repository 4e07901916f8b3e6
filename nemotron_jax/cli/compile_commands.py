"""`compile`: AOT-compile a run's step for a target this host does not have (e.g. a TPU slice)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from nemotron_jax.aot.steps import TASKS
from nemotron_jax.cli.plan_commands import add_adapter_args, lora_config, parse_mesh


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
                   help="parameter dtype (default: float32 for training, bfloat16 for inference and a LoRA base)")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--attention-impl", choices=["auto", "xla", "pallas"], default="auto",
                   help="auto (default): what a run on the target uses, pallas (splash) on TPU, xla on CPU")
    add_adapter_args(p)
    p.add_argument("--no-scan", action="store_true", help="unroll the layers (slow compiles of deep stacks)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=compile_command)


def compile_command(args: argparse.Namespace) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling needs no accelerator: never grab one
    from nemotron_jax.aot import compile_for, default_policy, format_report, parse_target
    from nemotron_jax.presets import resolve_config

    cfg = resolve_config(args.model)
    mesh = parse_mesh(args.mesh, args.rules)
    for name in ("batch", "seq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    lora = lora_config(args)
    target = parse_target(args.target)
    policy = dataclasses.replace(default_policy(args.task, target.platform, lora.rank if lora else 0),
                                 compute_dtype=args.compute_dtype, scan_layers=not args.no_scan,
                                 attention_impl=args.attention_impl)
    policy = dataclasses.replace(policy, **{k: v for k, v in (("param_dtype", args.dtype), ("remat", args.remat))
                                            if v is not None})
    report = compile_for(cfg, target, mesh, args.task, args.batch, args.seq, policy=policy,
                         cache_len=args.cache_len, grad_accum=args.grad_accum, quantize=args.quantize, lora=lora)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
