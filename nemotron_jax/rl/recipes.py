"""`kind: grpo` and `kind: dpo` recipes: build (or briefly SFT) the starting policy, then run.

A recipe stays self-contained with `start.sft_steps`: the `model.source` preset is first trained
by reasoning SFT (both toggle modes) as a stage of its own in `{output_dir}/sft` (checkpointed and
resumable like any run), because RL needs a policy whose answers can already earn some reward.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tqdm.auto import tqdm

from nemotron_jax.data.pipeline import DataConfig
from nemotron_jax.model.model import Model
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.config import Recipe
from nemotron_jax.train.loop import TrainResult


def sft_stage(recipe: Recipe) -> Recipe:
    """The SFT recipe that produces the starting policy of an RL recipe."""
    s = recipe.start
    synthetic = s.sft_data.split(":", 1)[1] if s.sft_data.startswith("synthetic:") else "none"
    data = DataConfig(path="" if synthetic != "none" else s.sft_data, synthetic=synthetic,
                      synthetic_examples=4096, tokenizer=recipe.data.tokenizer, seq_len=s.sft_seq_len,
                      batch_size=s.sft_batch_size, reasoning="auto")
    return dataclasses.replace(
        recipe, kind="sft", output_dir=str(Path(recipe.output_dir) / "sft"), steps=s.sft_steps,
        checkpoint_every=max(1, min(recipe.checkpoint_every * 10, s.sft_steps)), eval_every=0, log_every=10,
        data=data, optimizer=dataclasses.replace(recipe.optimizer, lr=s.sft_lr, warmup_ratio=0.1,
                                                 schedule="cosine", weight_decay=0.0))


def starting_policy(recipe: Recipe) -> Model:
    from nemotron_jax.train.recipes import build_model, run_recipe

    layout = recipe.mesh.layout()
    if recipe.start.sft_steps <= 0:
        return build_model(recipe.model, recipe.seed, layout)
    stage = sft_stage(recipe)
    done = Path(stage.output_dir) / "model"
    if done.is_dir():
        return build_model(dataclasses.replace(recipe.model, source=str(done)), recipe.seed, layout)
    tqdm.write(f"start: SFT of {recipe.model.source} for {stage.steps} steps in {stage.output_dir}")
    run_recipe(stage)
    return build_model(dataclasses.replace(recipe.model, source=str(done)), recipe.seed, layout)


def run_rl_recipe(recipe: Recipe) -> TrainResult:
    from nemotron_jax.rl.dpo import run_dpo
    from nemotron_jax.rl.grpo import run_grpo

    tokenizer = Tokenizer.from_file(recipe.data.tokenizer)
    model = starting_policy(recipe)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {recipe.data.tokenizer!r} has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    if recipe.kind == "grpo":
        return run_grpo(recipe, model, tokenizer, recipe.grpo, recipe.sampling, recipe.prompts)
    return run_dpo(recipe, model, tokenizer, recipe.dpo, recipe.sampling, recipe.prompts)


