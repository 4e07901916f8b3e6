"""`puzzle`: Puzzle NAS from a Llama parent (library, BLD, scoring, MIP search, assembly + KD) and FFN Fusion."""

from __future__ import annotations

import argparse
import json

_STAGES = {"build-library": "library", "score": "score", "search": "search", "assemble": "assemble", "run": "summary"}
_HELP = {"build-library": "train the parent if needed, build the block library and run BLD",
         "score": "... then score every candidate by replace-one-block KL",
         "search": "... then measure costs and solve the MIP under the constraints",
         "assemble": "... then assemble the chosen child and recover it by KD",
         "run": "every stage, then write {output_dir}/summary.json"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("puzzle", help="Puzzle architecture search and FFN Fusion",
                       description="Puzzle NAS driven by one YAML (e.g. configs/puzzle/tiny.yaml). Each stage writes "
                                   "its output under output_dir and is reused when run again (resumable).")
    stages = p.add_subparsers(dest="stage", required=True)
    for name, help_text in _HELP.items():
        s = stages.add_parser(name, help=help_text, description=help_text)
        s.add_argument("config", help="puzzle YAML, e.g. configs/puzzle/tiny.yaml")
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides, e.g. output_dir=outputs/p search.speedup=2 bld.steps=50")
        s.set_defaults(func=run_stage)
    f = stages.add_parser("fuse", help="fuse runs of attention-free FFN blocks of a model into wide FFNs",
                          description="FFN Fusion: every run of >= --min-run consecutive attention-free SwiGLU "
                                      "blocks becomes one wide SwiGLU block (exact for the parallel formulation).")
    f.add_argument("model", help="HF or saved model directory")
    f.add_argument("output", help="output directory (must not exist or be empty)")
    f.add_argument("--min-run", type=int, default=2)
    f.add_argument("--format", choices=["decilm", "native"], default="decilm",
                   help="decilm: HF DeciLM (fused widths must be multiples of 256); native: Model.save")
    f.set_defaults(func=fuse)


def run_stage(args: argparse.Namespace) -> None:
    from nemotron_jax.puzzle.config import load_config
    from nemotron_jax.puzzle.pipeline import Puzzle

    cfg = load_config(args.config, args.overrides)
    result = Puzzle(cfg).run(_STAGES[args.stage])
    if args.stage == "run":
        keep = ("parent_params", "child_params", "measured_speedup", "constraint_met", "retained", "architecture")
        print(json.dumps({k: result[k] for k in keep}, indent=1))
    print(f"puzzle {args.stage}: done; outputs in {cfg.output_dir}")


def fuse(args: argparse.Namespace) -> None:
    import nemotron_jax as nj
    from nemotron_jax.puzzle.fusion import find_runs, fuse

    model = nj.load(args.model)
    runs = find_runs(model.config, args.min_run)
    if not runs:
        raise ValueError(f"{args.model}: no run of >= {args.min_run} attention-free SwiGLU blocks to fuse")
    fused = fuse(model, runs)
    fused.save_hf(args.output) if args.format == "decilm" else fused.save(args.output)
    print(f"fused runs {runs}: {model.config.num_layers} -> {fused.config.num_layers} blocks; saved to {args.output}")
