"""From a chosen architecture to a model: library weights into an `nj.Model`, then KD recovery.

The child keeps the parent's embeddings, final norm and LM head; block i takes the library's
weights of its chosen attention and FFN variants, unchanged (they were built in the model's own
parameter layout). Recovery is global knowledge distillation from the parent (SPEC §5:
L = L_KL + L_cos, LM loss excluded), run by the training package's `kd` recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from nemotron_jax.api import Model
from nemotron_jax.config import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from nemotron_jax.data.pipeline import DataConfig
from nemotron_jax.model.params import assemble, flat_params
from nemotron_jax.model.transformer import Policy
from nemotron_jax.puzzle import subblocks as sb
from nemotron_jax.puzzle.config import RecoveryConfig
from nemotron_jax.puzzle.library import Library

Choice = Sequence[tuple[AttentionConfig, FFNConfig]]


def child_config(parent: ModelConfig, choice: Choice) -> ModelConfig:
    if len(choice) != parent.num_layers:
        raise ValueError(f"an architecture needs one choice per layer ({parent.num_layers}), got {len(choice)}")
    return parent.replace(blocks=tuple(BlockConfig(a, sb.plain_variant(f)) for a, f in choice))


def choice_of(cfg: ModelConfig) -> list[tuple[AttentionConfig, FFNConfig]]:
    return [(b.attention, sb.plain_variant(b.ffn)) for b in cfg.blocks]


def child_flat(parent: Model, library: Library, choice: Choice) -> dict[tuple, jnp.ndarray]:
    """The child's flat parameter dict: parent outside the layers, library weights inside."""
    flat = {k: v for k, v in flat_params(parent.module).items() if k[0] != "layers"}
    for i, (att, ffn) in enumerate(choice):
        for variant in (att, ffn):
            cand = library.get(i, variant)
            for path, value in cand.params.items():
                flat[("layers", i, cand.kind, *path)] = jnp.asarray(value)
    return flat


def assemble_child(parent: Model, library: Library, choice: Choice, policy: Policy | None = None) -> Model:
    """The child model with exactly the library's weights (no initialisation is run)."""
    cfg = child_config(parent.config, choice)
    return Model(assemble(cfg, policy or parent.policy, child_flat(parent, library, choice)), parent.layout)


def describe(choice: Choice) -> list[str]:
    """One short string per layer, e.g. "gqa2 swiglu512"."""
    return [f"{sb.variant_name(a)} {sb.variant_name(f)}" for a, f in choice]


def kd_recover(student_dir: str | Path, teacher_dir: str | Path, output_dir: str | Path, data: DataConfig,
               cfg: RecoveryConfig, seed: int = 0, progress: bool = True) -> Model:
    """Global KD of the saved child from the saved parent (resumable: the recipe checkpoints).

    Uses the training package's `kd` recipe with the loss `cfg.loss()` (by default forward
    KL(parent‖child) on logits plus (1 − cos) on the final hidden states, no LM term).
    Returns the distilled child (also saved in `{output_dir}/model`)."""
    from nemotron_jax.train import KDRecipe, run_training
    from nemotron_jax.train.config import ModelSpec, TeacherSpec
    from nemotron_jax.train.optim import OptimizerConfig

    recipe = KDRecipe(
        output_dir=str(output_dir), seed=seed, steps=cfg.steps, log_every=max(1, min(10, cfg.steps)),
        checkpoint_every=max(1, cfg.steps // 2), progress=progress, eval_batches=2,
        model=ModelSpec(source=str(student_dir)), teacher=TeacherSpec(source=str(teacher_dir)),
        kd=cfg.loss(),
        data=dataclasses.replace(data), optimizer=OptimizerConfig(
            lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0))
    return run_training(recipe).model


def numpy_flat(model: Model) -> dict[tuple, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_params(model.module).items()}
