"""The heterogeneous decoder as NNX modules: blocks that follow their `BlockConfig`, the stack."""

from nemotron_jax.model.forward import forward
from nemotron_jax.model.transformer import Block, Policy, Transformer

__all__ = ["Block", "Policy", "Transformer", "forward"]
