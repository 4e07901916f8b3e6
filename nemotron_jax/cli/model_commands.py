"""`info`, `convert` and `demo`: inspecting models and moving them to and from Hugging Face."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nemotron_jax.config import ModelConfig
from nemotron_jax.presets import SAVED_CONFIG, resolve_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a model: layer table, parameters, KV-cache bytes")
    p.add_argument("path", help="a config.json, an HF directory, a saved model, or a preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=info)

    p = sub.add_parser("convert", help="HF directory -> saved model, or saved model -> HF directory")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=["decilm", "llama"], default="decilm",
                   help="HF layout when writing HF (llama only for homogeneous models)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype (default: the checkpoint's own)")
    p.add_argument("--mesh", default=None,
                   help="read/write each tensor in its shards over this mesh, e.g. fsdp=-1 (each host only its own)")
    p.add_argument("--rules", default=None, help="dp | fsdp | fsdp_tp, with --mesh")
    p.add_argument("--tokenizer", default=None,
                   help="when writing HF: also write this tokenizer's files (a path or 'tiny'), chat template included")
    p.add_argument("--merge-adapters", default=None, metavar="DIR",
                   help="merge this LoRA adapter (ours or PEFT) into the weights first (holds the whole model)")
    p.set_defaults(func=convert)

    p = sub.add_parser("demo", help="build a tiny heterogeneous model, round-trip it through HF format")
    p.add_argument("--preset", default="tiny-hetero")
    p.add_argument("--output", default="outputs/demo", help="where the HF copy is written")
    p.set_defaults(func=demo)


def describe(cfg: ModelConfig) -> dict:
    return {
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "num_attention_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim,
        "num_params": cfg.num_params(), "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token("bfloat16"),
        "layers": cfg.layer_table(),
    }


def format_table(cfg: ModelConfig) -> str:
    rows = cfg.layer_table()
    lines = [f"{'layer':>5}  {'attention':<12} {'ffn':<14} {'params':>16} {'kv B/token':>10}"]
    lines += [f"{r['layer']:>5}  {r['attention']:<12} {r['ffn']:<14} {r['params']:>16,} "
              f"{r['kv_bytes_per_token_bf16']:>10,}" for r in rows]
    lines.append(f"{cfg.num_layers} blocks, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
                 f"x {cfg.head_dim}, vocab {cfg.vocab_size}")
    lines.append(f"parameters: {cfg.num_params():,}; KV cache: {cfg.kv_cache_bytes_per_token('bfloat16'):,} "
                 "bytes/token (bf16)")
    return "\n".join(lines)


def info(args: argparse.Namespace) -> None:
    cfg = resolve_config(args.path)
    print(json.dumps(describe(cfg), indent=2) if args.json else format_table(cfg))


def convert(args: argparse.Namespace) -> None:
    """Stream tensor by tensor (a few hundred MB held at a time), never the whole model."""
    from nemotron_jax.cli.plan_commands import parse_mesh
    from nemotron_jax.convert.hf import hf_to_saved, saved_to_hf
    from nemotron_jax.errors import CheckpointError

    src = Path(args.src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a model directory")
    to_hf = (src / SAVED_CONFIG).is_file()
    dtype = args.dtype or _checkpoint_dtype(src)
    layout = None if args.mesh is None else parse_mesh(args.mesh, args.rules).layout()
    if getattr(args, "merge_adapters", None):
        from nemotron_jax.api import load
        from nemotron_jax.tokenizer import Tokenizer

        merged = load(src, dtype, adapters=args.merge_adapters, layout=layout).merge_adapters()
        if to_hf:
            tokenizer = None if args.tokenizer is None else Tokenizer.from_file(args.tokenizer)
            merged.save_hf(args.dst, args.format, tokenizer=tokenizer)
        else:
            merged.save(args.dst)
        print(f"wrote {args.dst} (adapters {args.merge_adapters} merged, {dtype})")
        return
    if to_hf:
        from nemotron_jax.convert.hf_files import export_writer
        from nemotron_jax.presets import read_saved_config
        from nemotron_jax.tokenizer import Tokenizer

        tokenizer = None if args.tokenizer is None else Tokenizer.from_file(args.tokenizer)
        extra = export_writer(read_saved_config(src), args.format, tokenizer)
        cfg = saved_to_hf(src, args.dst, dtype, args.format, layout, extra=extra)
    else:
        if args.tokenizer is not None:
            raise CheckpointError("--tokenizer is for writing HF (the source is an HF directory)")
        cfg = hf_to_saved(src, args.dst, dtype, layout)
    print(f"wrote {args.dst} ({'HF ' + args.format if to_hf else 'nemotron-jax'}, {dtype}, "
          f"{cfg.num_params():,} params)")


def _checkpoint_dtype(src: Path) -> str:
    """The dtype the checkpoint was written in (anything but float32 loads as bfloat16)."""
    return "float32" if resolve_config(src).torch_dtype == "float32" else "bfloat16"


def demo(args: argparse.Namespace) -> None:
    import numpy as np

    from nemotron_jax.api import init, load
    from nemotron_jax.presets import preset

    cfg = preset(args.preset)
    print(format_table(cfg))
    model = init(cfg, seed=0)
    out = Path(args.output) / "hf"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    model.save_hf(out)
    reloaded = load(out)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 16))
    diff = float(np.abs(model.logits(tokens) - reloaded.logits(tokens)).max())
    print(f"\nround trip through HF DeciLM format at {out}: max |logits difference| = {diff:.1e}")
    if diff != 0.0:
        raise ValueError("round trip changed the logits")
