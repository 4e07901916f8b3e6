"""From a `Recipe` to a finished run: model, teacher, tokenizer, data, strategy -> `loop.train`.

Kinds map onto the two strategies: `lm`, `cpt` and `sft` train next-token cross-entropy on the
weighted tokens (all tokens of text data; assistant tokens of chat data), `kd` distils a frozen
teacher. A KD recipe stays self-contained with `teacher.pretrain_steps`: the teacher preset is
first trained as an `lm` stage in `{output_dir}/teacher` (itself checkpointed and resumable).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from tqdm import tqdm

import nemotron_jax as nj
from nemotron_jax.data.pipeline import DataPipeline, resolve_path
from nemotron_jax.errors import ConfigError
from nemotron_jax.sharding import Layout
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.config import ModelSpec, Recipe, TeacherSpec
from nemotron_jax.train.loop import TrainResult, train
from nemotron_jax.train.strategies import KDStrategy, LMStrategy, Strategy, check_teacher


def build_model(spec: ModelSpec, seed: int, layout: Layout | None) -> nj.Model:
    """A saved/HF model directory is loaded; anything else is a preset or config, freshly initialised."""
    options = dict(dtype=spec.dtype, compute_dtype=spec.compute_dtype, layout=layout, remat=spec.remat,
                   scan_layers=spec.scan_layers, attention_impl=spec.attention_impl, ffn_impl=spec.ffn_impl)
    if Path(spec.source).is_dir():
        return nj.load(spec.source, **options)
    return nj.init(spec.source, seed=seed, **options)


def make_strategy(recipe: Recipe) -> Strategy:
    if recipe.kind == "kd":
        k = recipe.kd
        return KDStrategy(k.temperature, k.kl_weight, k.cosine_weight, k.lm_weight, k.top_k,
                          chunk_tokens=recipe.loss_chunk_tokens)
    return LMStrategy(chunk_tokens=recipe.loss_chunk_tokens)


def teacher_recipe(recipe: Recipe) -> Recipe:
    """The `lm` stage that pretrains the teacher preset on the recipe's own data."""
    t = recipe.teacher
    return dataclasses.replace(
        recipe, kind="lm", output_dir=str(Path(recipe.output_dir) / "teacher"), steps=t.pretrain_steps,
        checkpoint_every=max(1, min(recipe.checkpoint_every, t.pretrain_steps)), eval_every=0,
        model=ModelSpec(source=t.source, dtype=t.dtype, compute_dtype=t.compute_dtype),
        optimizer=dataclasses.replace(recipe.optimizer, lr=t.pretrain_lr), teacher=TeacherSpec())


def build_teacher(recipe: Recipe, layout: Layout | None) -> nj.Model:
    t = recipe.teacher
    spec = ModelSpec(source=t.source, dtype=t.dtype, compute_dtype=t.compute_dtype)
    if t.pretrain_steps <= 0:
        if not Path(t.source).is_dir():
            tqdm.write(f"warning: teacher {t.source!r} is a freshly initialised preset (teacher.pretrain_steps=0)",
                       file=sys.stderr)
        return build_model(spec, recipe.seed, layout)
    if Path(t.source).is_dir():
        raise ConfigError("teacher.pretrain_steps needs teacher.source to be a preset, not a model directory")
    stage = teacher_recipe(recipe)
    done = Path(stage.output_dir) / "model"
    if done.is_dir():
        return build_model(dataclasses.replace(spec, source=str(done)), recipe.seed, layout)
    tqdm.write(f"teacher: pretraining {t.source} for {t.pretrain_steps} steps in {stage.output_dir}", file=sys.stderr)
    return run_recipe(stage).model


def run_recipe(recipe: Recipe) -> TrainResult:
    """Run `recipe` to completion (resuming from its checkpoints when there are any)."""
    recipe.validate()
    if recipe.kind in ("grpo", "dpo"):
        from nemotron_jax.rl.recipes import run_rl_recipe

        return run_rl_recipe(recipe)
    layout = recipe.mesh.layout()
    if recipe.data.batch_size % layout.batch_shards:
        raise ConfigError(f"data.batch_size {recipe.data.batch_size} must be a multiple of {layout.batch_shards}, the "
                          f"number of ways the mesh {dict(layout.mesh.shape)} splits the batch (change the batch "
                          "size or mesh.data / mesh.fsdp)")
    tokenizer = Tokenizer.from_file(recipe.data.tokenizer)
    pipeline = DataPipeline(recipe.data, tokenizer, recipe.seed, resolve_path(recipe.data, recipe.output_dir))
    model = build_model(recipe.model, recipe.seed, layout)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {recipe.data.tokenizer!r} has {tokenizer.vocab_size} tokens but the model's "
                          f"vocab_size is {model.config.vocab_size}")
    strategy = make_strategy(recipe)
    teacher = None
    if recipe.kind == "kd":
        teacher = build_teacher(recipe, layout)
        check_teacher(model.module, teacher.module, strategy)
    return train(recipe, model, strategy, pipeline, teacher)
