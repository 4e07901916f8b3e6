"""Training: the one loop (`loop.run`) over strategies and batch sources, and the data recipes."""

from nemotron_jax.train.config import KDRecipe, LMRecipe, RunConfig
from nemotron_jax.train.loop import TrainingError, TrainResult, run
from nemotron_jax.train.recipes import run_training

__all__ = ["KDRecipe", "LMRecipe", "RunConfig", "TrainResult", "TrainingError", "run", "run_training"]
