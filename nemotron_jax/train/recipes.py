"""Data recipes (`lm`, `cpt`, `sft`, `kd`): model, tokenizer, data source and strategy -> `loop.run`.

`lm`, `cpt` and `sft` train next-token cross-entropy on the weighted tokens (all tokens of text
data; assistant tokens of chat data); `kd` distils a frozen teacher. A KD recipe stays
self-contained with `teacher.pretrain_steps`: the teacher preset is first trained as an `lm`
stage in `{output_dir}/teacher` (itself checkpointed and resumable).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nemotron_jax.api import Model, init, load
from nemotron_jax.data.pipeline import DataPipeline, resolve_path
from nemotron_jax.errors import ConfigError
from nemotron_jax.lora import LoRAConfig
from nemotron_jax.sharding import Layout
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.config import KDRecipe, LMRecipe, ModelSpec
from nemotron_jax.train.loop import TrainResult, log, run
from nemotron_jax.train.sources import PipelineSource
from nemotron_jax.train.strategies import KDStrategy, LMStrategy, check_teacher


def build_model(spec: ModelSpec, seed: int, layout: Layout | None) -> Model:
    """A saved/HF model directory is loaded; anything else is a preset or config, freshly initialised;
    `spec.quantize` then stores its projections as int8 / int4 (the frozen base of QLoRA). The
    recipe's `lora` adapters are added by the loop (`loop.ensure_adapters`)."""
    p = spec.policy()
    options = dict(dtype=p.param_dtype, compute_dtype=p.compute_dtype, layout=layout, remat=p.remat,
                   scan_layers=p.scan_layers, attention_impl=p.attention_impl, ffn_impl=p.ffn_impl)
    if Path(spec.source).is_dir():
        return load(spec.source, quantize=spec.quantize, **options)
    model = init(spec.source, seed=seed, **options)
    return model if spec.quantize is None else model.quantize(spec.quantize)


def check_setup(tokenizer_spec: str, tokenizer: Tokenizer, model: Model, rows: int | None = None) -> None:
    """Fail before any compute when the vocabularies differ or a batch of `rows` cannot split over
    the mesh (RL sources size their own batches to split)."""
    layout = model.layout
    if layout is not None and rows is not None and rows % layout.batch_shards:
        raise ConfigError(f"a batch of {rows} rows must be a multiple of {layout.batch_shards}, the number of ways "
                          f"the mesh {dict(layout.mesh.shape)} splits the batch (change the batch size or "
                          "mesh.data / mesh.fsdp)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_spec!r} has {tokenizer.vocab_size} tokens but the model's "
                          f"vocab_size is {model.config.vocab_size}")


def run_training(recipe: LMRecipe) -> TrainResult:
    """Run a data recipe (`LMRecipe` or `KDRecipe`) to completion, resuming from its checkpoints."""
    recipe.validate()
    layout = recipe.mesh.layout()
    tokenizer = Tokenizer.from_file(recipe.data.tokenizer)
    pipeline = DataPipeline(recipe.data, tokenizer, recipe.seed, resolve_path(recipe.data, recipe.output_dir))
    for message in pipeline.messages:
        log(f"data: {message}")
    model = build_model(recipe.model, recipe.seed, layout)
    check_setup(recipe.data.tokenizer, tokenizer, model, recipe.data.batch_size)
    strategy: LMStrategy | KDStrategy = LMStrategy(chunk_tokens=recipe.loss_chunk_tokens)
    teacher = None
    if isinstance(recipe, KDRecipe):
        k = recipe.kd
        strategy = KDStrategy(k.temperature, k.kl_weight, k.cosine_weight, k.lm_weight, k.top_k,
                              chunk_tokens=recipe.loss_chunk_tokens)
        teacher = build_teacher(recipe, layout)
        check_teacher(model.module, teacher.module, strategy)
    return run(recipe, model, strategy, PipelineSource(pipeline), teacher=teacher,
               eval_batches=pipeline.eval_batches(recipe.eval_batches))


def teacher_stage(recipe: KDRecipe) -> LMRecipe:
    """The `lm` stage that pretrains the teacher preset on the recipe's own data."""
    t = recipe.teacher
    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(LMRecipe)}
    return LMRecipe(**{
        **fields, "kind": "lm", "output_dir": str(Path(recipe.output_dir) / "teacher"), "steps": t.pretrain_steps,
        "checkpoint_every": max(1, min(recipe.checkpoint_every, t.pretrain_steps)), "eval_every": 0,
        "model": t.model(), "optimizer": dataclasses.replace(recipe.optimizer, lr=t.pretrain_lr),
        "lora": LoRAConfig()})  # the teacher trains in full, whatever the student's LoRA


def build_teacher(recipe: KDRecipe, layout: Layout | None) -> Model:
    t = recipe.teacher
    if t.pretrain_steps <= 0:
        if not Path(t.source).is_dir():
            log(f"warning: teacher {t.source!r} is a freshly initialised preset (teacher.pretrain_steps=0)")
        return build_model(t.model(), recipe.seed, layout)
    if Path(t.source).is_dir():
        raise ConfigError("teacher.pretrain_steps needs teacher.source to be a preset, not a model directory")
    stage = teacher_stage(recipe)
    done = Path(stage.output_dir) / "model"
    if done.is_dir():
        return build_model(dataclasses.replace(t.model(), source=str(done)), recipe.seed, layout)
    log(f"teacher: pretraining {t.source} for {t.pretrain_steps} steps in {stage.output_dir}")
    return run_training(stage).model
