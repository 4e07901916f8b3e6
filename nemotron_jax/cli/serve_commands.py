"""`serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (docs/serve.md).

Models and tokenizers resolve as in `generate` (a path nj.load reads, or a preset name with random
weights and a warning; `--tokenizer tiny` is the default for 512-token models). Everything that
can be checked without weights is checked before they load. FastAPI and uvicorn are imported only
when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nemotron_jax.cli.generate_commands import OFF_DEFAULTS, ON_DEFAULTS, add_weight_args, load_model, load_tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    p.add_argument("model", help="anything nj.load accepts, or a preset name (random weights, with a warning)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or its directory, or 'tiny' (the default for 512-token models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: MODEL as given)")
    p.add_argument("--mesh", default=None, help="shard the weights and cache, e.g. tensor=4 or fsdp=8 "
                   "(default: one device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="parameter dtype (bfloat16 halves the memory of a real model)")
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None,
                   help="KV-cache dtype (default: the parameter dtype)")
    add_weight_args(p)  # --quantize, --adapters
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    p.add_argument("--num-pages", type=int, default=None, help="KV-cache pages (default: sized from memory)")
    p.add_argument("--default-max-tokens", type=int, default=2048,
                   help="max_tokens of a request that sets none (clipped to the context left)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve)


def server_config(name: str, tokenizer: Any, model_config: Any, default_max_tokens: int = 2048) -> Any:
    """The app's `ServerConfig`: stop on the tokenizer's and the config's eos ids, and the CLI's
    reasoning-dependent sampling defaults (the same as `generate`'s)."""
    from nemotron_jax.serve import ServerConfig

    stop = tuple(sorted(set(tokenizer.eos_ids) | set(model_config.eos_token_ids)))
    return ServerConfig(name, stop, dict(ON_DEFAULTS), dict(OFF_DEFAULTS), model_config.max_position_embeddings,
                        default_max_tokens)


def build_app(model: Any, tokenizer: Any, name: str, *, max_batch: int = 32, page_size: int = 16,
              num_pages: int | None = None, cache_dtype: str | None = None, default_max_tokens: int = 2048) -> Any:
    """The FastAPI app serving `model` (its engine is `app.state.engine`)."""
    from nemotron_jax.engine import Engine
    from nemotron_jax.serve import create_app

    engine = Engine(model, max_batch, page_size, num_pages, cache_dtype=cache_dtype,
                    think_tokens=tokenizer.think_tokens)
    return create_app(engine, tokenizer, server_config(name, tokenizer, model.config, default_max_tokens))


def _load(args: argparse.Namespace) -> Any:
    from nemotron_jax.cli.plan_commands import parse_mesh

    layout = parse_mesh(args.mesh, None).layout() if args.mesh else None
    return load_model(args.model, args.dtype, args.quantize, args.adapters, layout)  # a preset: with a warning


def serve(args: argparse.Namespace) -> None:
    from nemotron_jax.presets import resolve_config

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must lie in [0, 65535], got {args.port}")
    for flag in ("max_batch", "page_size", "default_max_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_pages is not None and args.num_pages < 2:
        raise ValueError(f"--num-pages must be >= 2, got {args.num_pages}")
    try:
        config = resolve_config(args.model)
    except ValueError:
        raise ValueError(f"{args.model}: not a model directory or a preset name") from None
    tokenizer = load_tokenizer(args.tokenizer, config.vocab_size)
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    model = _load(args)
    name = args.served_model_name or args.model.rstrip("/")
    app = build_app(model, tokenizer, name, max_batch=args.max_batch, page_size=args.page_size,
                    num_pages=args.num_pages, cache_dtype=args.cache_dtype, default_max_tokens=args.default_max_tokens)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({app.state.engine.num_pages} pages of "
          f"{args.page_size} tokens, batch {args.max_batch})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
