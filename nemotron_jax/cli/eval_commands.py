"""`eval`: reasoning accuracy per toggle mode and loss/perplexity of a model on a JSONL set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy (thinking on/off) and loss/perplexity on a dataset")
    p.add_argument("model", help="an HF directory, a saved model, or a preset name (random weights)")
    p.add_argument("--data", required=True, help="JSONL: {question, answer} rows for accuracy; "
                   "{text} or chat rows for loss; or synthetic:arith|chain|chain4 (held-out problems)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding it, or 'tiny'")
    p.add_argument("--thinking", choices=["on", "off", "both"], default="both")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records only "
                   "(synthetic: N problems, default 256)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=None, help="default: 0.6 thinking on, greedy off")
    p.add_argument("--top-p", type=float, default=None, help="default: 0.95 thinking on, 1.0 off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None, help="e.g. data=8 or fsdp=4,tensor=2 (default: one device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--output", default=None, help="also write the report as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=evaluate)


def evaluate(args: argparse.Namespace) -> None:
    from nemotron_jax.api import init, load
    from nemotron_jax.cli.plan_commands import parse_mesh
    from nemotron_jax.data.sources import eval_records
    from nemotron_jax.eval.perplexity import evaluate_loss
    from nemotron_jax.eval.reasoning import evaluate_reasoning
    from nemotron_jax.eval.report import format_table
    from nemotron_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    layout = parse_mesh(args.mesh, None).layout() if args.mesh else None
    if Path(args.model).exists():
        model = load(args.model, dtype=args.dtype, layout=layout)
    else:
        print(f"warning: {args.model} is not a path; evaluating a randomly initialised preset", file=sys.stderr)
        model = init(args.model, dtype=args.dtype, layout=layout)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"is {model.config.vocab_size}")
    records = eval_records(args.data, args.limit, args.seed)
    qa = [r for r in records if "question" in r and "answer" in r]
    other = [r for r in records if not ("question" in r and "answer" in r)]
    name = Path(args.model).name or str(args.model)
    rows = [evaluate_reasoning(model, tokenizer, qa, mode == "on", name=name, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed).to_dict()
            for mode in (("on", "off") if args.thinking == "both" else (args.thinking,)) if qa]
    report: dict = {"model": name, "data": args.data, "rows": rows}
    if other:
        report["loss"] = evaluate_loss(model, tokenizer, other)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else format_table(rows, report.get("loss")))
