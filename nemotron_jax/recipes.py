"""Recipes by kind: load one from YAML (`kind` picks its type) and run it.

    lm, cpt, sft -> train.config.LMRecipe  -> train.recipes.run_training
    kd           -> train.config.KDRecipe  -> train.recipes.run_training
    grpo         -> rl.config.GRPORecipe   -> rl.recipes.run_rl
    dpo          -> rl.config.DPORecipe    -> rl.recipes.run_rl

This module sits above both train/ and rl/, so neither needs to know the other's kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nemotron_jax.errors import ConfigError
from nemotron_jax.rl.config import DPORecipe, GRPORecipe
from nemotron_jax.rl.recipes import run_rl
from nemotron_jax.train.config import KDRecipe, LMRecipe
from nemotron_jax.train.loop import TrainResult
from nemotron_jax.train.recipes import run_training
from nemotron_jax.typed_yaml import apply_overrides, from_dict, read_yaml

Recipe = LMRecipe | KDRecipe | GRPORecipe | DPORecipe
TYPES: dict[str, type] = {"kd": KDRecipe, "cpt": LMRecipe, "sft": LMRecipe, "lm": LMRecipe, "grpo": GRPORecipe,
                          "dpo": DPORecipe}


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """A validated recipe from a YAML file (or the `lm` defaults when None) plus `key=value` overrides."""
    data = apply_overrides(read_yaml(path, "recipe") if path is not None else {}, overrides)
    kind = data.get("kind", "lm")
    if kind not in TYPES:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}kind: expected one of {', '.join(map(repr, TYPES))}, got {kind!r}")
    recipe = from_dict(TYPES[kind], data)
    recipe.validate()
    return recipe


def run_recipe(recipe: Recipe) -> TrainResult:
    """Run `recipe` to completion (resuming from its checkpoints when there are any)."""
    if isinstance(recipe, (GRPORecipe, DPORecipe)):
        return run_rl(recipe)
    return run_training(recipe)

