"""`eval`: benchmark accuracy to the report's protocol (`--benchmark`), or the quick reasoning table
and loss/perplexity of a model on a JSONL set (no `--benchmark`: the behaviour before benchmarks)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nemotron_jax.cli.generate_commands import add_weight_args, load_model

BENCHMARKS = ("gsm8k", "math", "mcq", "ifeval", "code")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="benchmark accuracy (thinking on/off, k samples) and loss/perplexity")
    p.add_argument("model", help="an HF directory, a saved model, or a preset name (random weights)")
    p.add_argument("--data", required=True, help="JSONL/Parquet in the benchmark's own schema; without "
                   "--benchmark: {question, answer} rows for accuracy, {text} or chat rows for loss; "
                   "or synthetic:arith|chain|chain4 (held-out problems)")
    p.add_argument("--benchmark", choices=BENCHMARKS, default=None,
                   help="grade with this benchmark's prompt and grader (see docs/eval.md)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding it, or 'tiny'")
    p.add_argument("--thinking", choices=["on", "off", "both"], default="both")
    p.add_argument("--samples", type=int, default=1, help="responses per problem (pass@1 is their mean; "
                   "maj@k and pass@k over them); --benchmark only")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records only "
                   "(synthetic: N problems, default 256)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-thinking-tokens", type=int, default=None, help="close the thought after N tokens")
    p.add_argument("--system", default=None, help="extra system prompt text, after 'detailed thinking on|off'")
    p.add_argument("--prompt-template", default=None, help="the user turn, e.g. '{question}' ('raw': the "
                   "record's question/problem/prompt as it is); default: the benchmark's own")
    p.add_argument("--shuffle-choices", type=int, default=None, metavar="SEED", help="mcq: shuffle the choices")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--temperature", type=float, default=None, help="default: 0.6 thinking on, greedy off")
    p.add_argument("--top-p", type=float, default=None, help="default: 0.95 thinking on, 1.0 off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", default=None, metavar="I/N", help="grade only batches b with b %% N == I "
                   "(default: this host's process index / count when the mesh is host-local)")
    p.add_argument("--mesh", default=None, help="e.g. data=8 or fsdp=4,tensor=2 (default: one device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_weight_args(p)
    p.add_argument("--output", default=None, help="with --benchmark: a directory for the responses "
                   "(JSONL, resumable) and summary; without: a JSON file for the report")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=evaluate)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from nemotron_jax.cli.plan_commands import parse_mesh
    from nemotron_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    layout = parse_mesh(args.mesh, None).layout() if args.mesh else None
    model = load_model(args.model, args.dtype, args.quantize, args.adapters, layout)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"is {model.config.vocab_size}")
    return model, tokenizer


def evaluate(args: argparse.Namespace) -> None:
    if args.benchmark is not None:
        return evaluate_benchmark(args)
    needs = [flag for flag, value in (("--samples", args.samples != 1), ("--system", args.system is not None),
                                      ("--prompt-template", args.prompt_template is not None),
                                      ("--shuffle-choices", args.shuffle_choices is not None),
                                      ("--shard", args.shard is not None)) if value]
    if needs:
        verb = "needs" if len(needs) == 1 else "need"
        raise ValueError(f"{', '.join(needs)} {verb} --benchmark (gsm8k, math, mcq, ifeval or code)")
    from nemotron_jax.data.sources import eval_records
    from nemotron_jax.eval.perplexity import evaluate_loss
    from nemotron_jax.eval.reasoning import evaluate_reasoning
    from nemotron_jax.eval.report import format_table

    records = eval_records(args.data, args.limit, args.seed)  # before loading: a bad path fails fast
    model, tokenizer = _load(args)
    qa = [r for r in records if "question" in r and "answer" in r]
    other = [r for r in records if not ("question" in r and "answer" in r)]
    name = Path(args.model).name or str(args.model)
    rows = [evaluate_reasoning(model, tokenizer, qa, mode == "on", name=name, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed, max_thinking_tokens=args.max_thinking_tokens).to_dict()
            for mode in (("on", "off") if args.thinking == "both" else (args.thinking,)) if qa]
    report: dict = {"model": name, "data": args.data, "rows": rows}
    if other:
        report["loss"] = evaluate_loss(model, tokenizer, other)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else format_table(rows, report.get("loss")))


def _parse_shard(text: str | None, model: Any) -> tuple[int, int]:
    if text is not None:
        i, sep, n = text.partition("/")
        if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
            raise ValueError(f"--shard: expected I/N with 0 <= I < N, got {text!r}")
        return int(i), int(n)
    import jax

    layout = getattr(model, "layout", None)
    devices = [] if layout is None else list(layout.mesh.devices.flat)
    if all(d.process_index == jax.process_index() for d in devices):
        return jax.process_index(), jax.process_count()  # each host runs its own copy of the model
    return 0, 1  # one model across hosts: every host takes part in every batch


def evaluate_benchmark(args: argparse.Namespace) -> None:
    import jax

    from nemotron_jax import distributed
    from nemotron_jax.data.sources import eval_records
    from nemotron_jax.eval import benchmarks, outputs, protocol
    from nemotron_jax.fileio import atomic_write_text

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    options: dict[str, Any] = {"system": args.system}
    if args.prompt_template is not None:
        raw = {"math": "problem", "ifeval": "prompt", "code": "prompt"}.get(args.benchmark, "question")
        options["template"] = "{" + raw + "}" if args.prompt_template == "raw" else args.prompt_template
    if args.shuffle_choices is not None:
        if args.benchmark != "mcq":
            raise ValueError("--shuffle-choices applies to --benchmark mcq only")
        options["shuffle_seed"] = args.shuffle_choices
    bench = benchmarks.get(args.benchmark, **options)
    records = eval_records(args.data, args.limit, args.seed, check=bench.check)
    if not records:
        raise ValueError(f"{args.data}: no records to evaluate")
    for record in records[:1]:  # a template naming a missing key fails here, not after generation
        try:
            bench.messages(record)
        except KeyError as e:
            raise ValueError(f"--prompt-template names {e} but the {args.benchmark} records have no such key") from None
    model, tokenizer = _load(args)
    shard, num_shards = _parse_shard(args.shard, model)
    if num_shards > 1 and not args.output:
        raise ValueError("a sharded evaluation needs --output DIR (each shard writes its part there)")
    name = Path(args.model).name or str(args.model)
    rows = []
    for mode in (("on", "off") if args.thinking == "both" else (args.thinking,)):
        results, timing = protocol.run(
            model, tokenizer, bench, records, mode == "on", samples=args.samples, max_new_tokens=args.max_new_tokens,
            max_thinking_tokens=args.max_thinking_tokens, batch_size=args.batch_size, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, output_dir=args.output, shard=shard, num_shards=num_shards)
        if num_shards > 1:
            distributed.barrier(f"eval-{bench.name}-{mode}")
            if jax.process_index() != 0:
                continue
            merged = outputs.merge(args.output, bench.name, mode, range(len(records)))
            if merged is None:
                print(f"shard {shard}/{num_shards} done; the summary waits for the other shards' parts in "
                      f"{args.output} (run the remaining shards, or this command again, to merge)", file=sys.stderr)
                continue
            results = merged
        elif args.output:
            outputs.merge(args.output, bench.name, mode, range(len(records)))
        rows.append({"model": name, **protocol.summarize(bench, results, timing),
                     "kv_cache_bytes_per_token": model.config.kv_cache_bytes_per_token("bfloat16"),
                     "params": model.config.num_params()})
    if not rows:
        return
    report = {"model": name, "benchmark": bench.name, "data": args.data, "rows": rows}
    if args.output:
        atomic_write_text(Path(args.output) / f"{bench.name}.summary.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(Path(args.output) / f"{bench.name}.summary.md", protocol.format_summary(rows) + "\n")
    print(json.dumps(report, indent=2) if args.json else protocol.format_summary(rows))
