"""`train`: run a recipe (`kd`, `cpt`, `sft`, `lm`) from YAML with `key=value` overrides."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training recipe (resumes from its checkpoints when restarted)",
                       description="Run a training recipe. Restarting the same command resumes from the last "
                                   "checkpoint in {output_dir}/checkpoints.")
    p.add_argument("recipe", help="recipe YAML, e.g. configs/recipes/sft-tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optimizer.lr=1e-5 steps=200 output_dir=outputs/x mesh.fsdp=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from nemotron_jax.distributed import initialize
    from nemotron_jax.recipes import load_recipe, run_recipe

    initialize()  # joins a multi-host job when NEMOTRON_JAX_COORDINATOR (or the cluster) says so
    recipe = load_recipe(args.recipe, args.overrides)
    result = run_recipe(recipe)
    summary = {k: round(v, 4) for k, v in {**result.last_metrics, **result.eval_metrics}.items()
               if k in ("loss", "eval_loss", "eval_kl", "eval_ce")}
    print(f"trained {recipe.kind} to step {recipe.steps}: {summary}; model at {result.model_dir}")
