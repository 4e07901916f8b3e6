"""`kind: grpo` and `kind: dpo` recipes: build (or briefly SFT) the starting policy, then run the
one loop with the kind's batch source and strategy, the frozen start policy as the reference.

A recipe stays self-contained with `start.sft_steps`: the `model.source` preset is first trained
by reasoning SFT (both toggle modes) as a stage of its own in `{output_dir}/sft` (checkpointed and
resumable like any run), because RL needs a policy whose answers can already earn some reward.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from nemotron_jax.api import Model
from nemotron_jax.data.pipeline import DataConfig
from nemotron_jax.lora import base_view, has_adapters
from nemotron_jax.rl.config import DPORecipe, GRPORecipe, RLRecipe
from nemotron_jax.rl.dpo import pair_source, preference_strategy
from nemotron_jax.rl.grpo import GRPOSource, grpo_strategy
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.config import LMRecipe, RunConfig
from nemotron_jax.train.loop import TrainResult, ensure_adapters, log, run
from nemotron_jax.train.recipes import build_model, check_setup, run_training


def sft_stage(recipe: RLRecipe) -> LMRecipe:
    """The SFT recipe that produces the starting policy of an RL recipe."""
    s = recipe.start
    data = DataConfig(path=s.sft_data, synthetic_examples=4096, tokenizer=recipe.data.tokenizer,
                      seq_len=s.sft_seq_len, batch_size=s.sft_batch_size, reasoning="auto")
    run_fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(RunConfig)}
    return LMRecipe(**{
        **run_fields, "kind": "sft", "output_dir": str(Path(recipe.output_dir) / "sft"), "steps": s.sft_steps,
        "checkpoint_every": max(1, min(recipe.checkpoint_every * 10, s.sft_steps)), "eval_every": 0,
        "log_every": 10, "data": data,
        "optimizer": dataclasses.replace(recipe.optimizer, lr=s.sft_lr, warmup_ratio=0.1, schedule="cosine",
                                         weight_decay=0.0)})


def starting_policy(recipe: RLRecipe) -> Model:
    layout = recipe.mesh.layout()
    if recipe.start.sft_steps <= 0:
        return build_model(recipe.model, recipe.seed, layout)
    stage = sft_stage(recipe)
    done = Path(stage.output_dir) / "model"
    if not done.is_dir():
        log(f"start: SFT of {recipe.model.source} for {stage.steps} steps in {stage.output_dir}")
        run_training(stage)
    return build_model(dataclasses.replace(recipe.model, source=str(done)), recipe.seed, layout)


def frozen_copy(model: Model) -> Model:
    """The reference policy: the starting weights, copied once, never updated."""
    graphdef, params = nnx.split(model.module)
    return Model(nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), params)), model.layout)


def reference_policy(model: Model) -> Model:
    """The frozen reference: with LoRA the base itself without the adapters (the same arrays, which
    never change: no second copy); otherwise a copy of the starting weights."""
    if has_adapters(model.module):
        return Model(base_view(model.module), model.layout)
    return frozen_copy(model)


def run_rl(recipe: GRPORecipe | DPORecipe) -> TrainResult:
    """Run a GRPO or DPO recipe to completion, resuming from its checkpoints."""
    recipe.validate()
    tokenizer = Tokenizer.from_file(recipe.data.tokenizer)
    model = starting_policy(recipe)
    check_setup(recipe.data.tokenizer, tokenizer, model)
    ensure_adapters(model, recipe.lora, recipe.seed)  # before the source and the reference see the model
    if isinstance(recipe, GRPORecipe):
        strategy, source = grpo_strategy(recipe), GRPOSource(recipe, model, tokenizer)
        updates = recipe.grpo.updates_per_iteration
    else:
        strategy, source = preference_strategy(recipe), pair_source(recipe, model, tokenizer)
        updates = recipe.dpo.updates_per_iteration
    reference = reference_policy(model) if strategy.needs_teacher else None
    return run(recipe, model, strategy, source, teacher=reference, updates_per_batch=updates)
