"""`plan`: per-device memory of a run on a given mesh, and the smallest slice it fits."""

from __future__ import annotations

import argparse
import json
import math

from nemotron_jax.lora import LoRAConfig
from nemotron_jax.plan import DEVICE_MEMORY, GiB, MemoryPlan, min_devices, plan_memory
from nemotron_jax.presets import resolve_config
from nemotron_jax.sharding import MESH_AXES, MeshConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device memory of training or inference on a mesh")
    p.add_argument("--model", required=True, help="preset name, config.json, HF dir or saved model")
    p.add_argument("--mesh", default="fsdp=-1", help="axis sizes, e.g. data=2,fsdp=4,tensor=8 (-1: the rest)")
    p.add_argument("--rules", default=None, help="dp | fsdp | fsdp_tp (default: fsdp_tp if tensor > 1 else fsdp)")
    p.add_argument("--devices", type=int, default=None, help="device count (default: the mesh's product)")
    p.add_argument("--batch", type=int, required=True, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, required=True, help="sequence length (train) or context (infer)")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--remat", default="full", help="train: none | full")
    p.add_argument("--attention-impl", default="pallas", choices=["pallas", "xla"],
                   help="xla materialises [T, T] attention scores; pallas (flash) does not")
    p.add_argument("--device", choices=sorted(DEVICE_MEMORY), default=None,
                   help="chip kind: say whether it fits, and with --find-devices how many are needed")
    p.add_argument("--find-devices", action="store_true", help="search the smallest power-of-two device count")
    add_adapter_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=plan)


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    """--quantize / --lora / --lora-targets: the same flags on `plan` and `compile`."""
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantized projections (inference, or the frozen QLoRA base)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train LoRA adapters of this rank (frozen bf16 base): gradients and AdamW for them only")
    p.add_argument("--lora-targets", default=",".join(LoRAConfig.targets), metavar="q,k,v,o,gate,up,down",
                   help="projections that get adapters (default: %(default)s)")


def lora_config(args: argparse.Namespace) -> LoRAConfig | None:
    """The adapters --lora / --lora-targets ask for (None without --lora); ConfigError if invalid."""
    if not args.lora:
        return None
    cfg = LoRAConfig(rank=args.lora, targets=tuple(t for t in args.lora_targets.split(",") if t))
    cfg.validate()
    return cfg


def parse_mesh(text: str, rules: str | None) -> MeshConfig:
    sizes: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in (*MESH_AXES, "dcn_data"):
            raise ValueError(f"--mesh: expected AXIS=SIZE with AXIS in {(*MESH_AXES, 'dcn_data')}, got {item!r}")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ValueError(f"--mesh: size of {key} must be an integer, got {value!r}") from None
    sizes.setdefault("fsdp", 1)
    rules = rules or ("fsdp_tp" if sizes.get("tensor", 1) > 1 else "fsdp")
    return MeshConfig(**sizes, rules=rules)


def plan(args: argparse.Namespace) -> None:
    cfg = resolve_config(args.model)
    mesh = parse_mesh(args.mesh, args.rules)
    lora = lora_config(args)
    kw = {"remat": args.remat, "attention_impl": args.attention_impl, "quantize": args.quantize,
          "lora_rank": lora.rank if lora else 0, "lora_targets": lora.targets if lora else LoRAConfig.targets}
    if args.find_devices:
        if args.device is None:
            raise ValueError("--find-devices needs --device")
        result = min_devices(cfg, DEVICE_MEMORY[args.device], args.batch, args.seq, args.mode, mesh, **kw)
        if result is None:
            raise ValueError(f"does not fit on any power-of-two count of {args.device} up to 65536")
    else:
        fixed = [mesh.data, mesh.fsdp, mesh.tensor, mesh.sequence]
        n = args.devices or (math.prod(fixed) * mesh.dcn_data if -1 not in fixed else None)
        if n is None:
            raise ValueError("the mesh has a -1 axis: give --devices N (or --find-devices with --device)")
        result = plan_memory(cfg, mesh, n, args.batch, args.seq, args.mode, **kw)
    out = result.to_dict()
    if args.device:
        out["device"], out["device_bytes"] = args.device, DEVICE_MEMORY[args.device]
        out["fits"] = result.fits(DEVICE_MEMORY[args.device])
    print(json.dumps(out, indent=2) if args.json else format_plan(result, args))


def format_plan(p: MemoryPlan, args: argparse.Namespace) -> str:
    rows = [("parameters", p.params_bytes), ("gradients", p.gradient_bytes), ("optimizer", p.optimizer_bytes),
            ("activations", p.activation_bytes), ("KV cache", p.kv_cache_bytes),
            *([("reference", p.reference_bytes)] if p.reference_bytes else []), ("total", p.total_bytes)]
    mesh = ", ".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [f"{args.mode} {args.model}: batch {args.batch} x seq {args.seq} on {p.num_devices} devices ({mesh})",
             *(f"  {name:<12} {value / GiB:10.2f} GiB per device" for name, value in rows)]
    if args.device:
        verdict = "fits" if p.fits(DEVICE_MEMORY[args.device]) else "does NOT fit"
        lines.append(f"  {verdict} in {args.device} ({DEVICE_MEMORY[args.device] / GiB:.0f} GiB, 90% usable)")
    if p.fallbacks:
        lines.append(f"  sharding fallbacks ({len(p.fallbacks)}): " + p.fallbacks[0]
                     + (f" ... and {len(p.fallbacks) - 1} more (--json lists all)" if len(p.fallbacks) > 1 else ""))
    return "\n".join(lines)
