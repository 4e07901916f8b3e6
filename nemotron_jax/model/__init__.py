"""The heterogeneous Nemotron-NAS decoder (NNX modules) and the `Model` handle."""

from nemotron_jax.model.model import Model, forward, init, load
from nemotron_jax.model.transformer import Block, Policy, Transformer

__all__ = ["Block", "Model", "Policy", "Transformer", "forward", "init", "load"]
