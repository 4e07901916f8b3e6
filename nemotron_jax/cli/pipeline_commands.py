"""`pipeline`: the whole recipe (Puzzle -> KD -> SFT -> GRPO -> eval -> HF export) from one YAML."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run the whole recipe end to end (resumable stage by stage)",
                       description="parent -> Puzzle search -> child assembly -> KD -> reasoning SFT -> GRPO -> "
                                   "evaluation -> HF export. Finished stages under output_dir are reused, so "
                                   "running the same command again resumes.")
    p.add_argument("config", help="pipeline YAML, e.g. configs/pipeline/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. output_dir=outputs/p eval.examples=64")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from nemotron_jax.distributed import initialize
    from nemotron_jax.eval.report import format_table
    from nemotron_jax.pipeline import Pipeline, load_pipeline

    initialize()
    cfg, base = load_pipeline(args.config, args.overrides)
    report = Pipeline(cfg, base).run()
    out = cfg.output_dir
    print(format_table(report["rows"]))
    p = report["puzzle"]
    print(f"\nPuzzle child: {p['child_params']:,} / {p['parent_params']:,} params, measured decode speed-up "
          f"{p['measured_speedup']:.2f}x; stage seconds {report['stage_seconds']}")
    print(f"report: {out}/report.json, {out}/report.md, {out}/report.png; HF export: {report['export']}")
