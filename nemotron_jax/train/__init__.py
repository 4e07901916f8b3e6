"""Training: one loop (`loop.train`) over strategies (`lm`, `kd`), recipes from YAML."""

from nemotron_jax.train.config import Recipe, load_recipe
from nemotron_jax.train.loop import TrainingError, TrainResult, train
from nemotron_jax.train.recipes import run_recipe

__all__ = ["Recipe", "TrainResult", "TrainingError", "load_recipe", "run_recipe", "train"]
