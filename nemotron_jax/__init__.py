"""nemotron-jax: Llama-Nemotron (Nemotron-NAS) models and their training recipe in JAX."""

from nemotron_jax import rewards
from nemotron_jax.api import Model, init, load
from nemotron_jax.config import AttentionConfig, BlockConfig, FFNConfig, ModelConfig, RopeScaling
from nemotron_jax.engine import Engine
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.model import Policy
from nemotron_jax.presets import preset, preset_names
from nemotron_jax.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "AttentionConfig", "BlockConfig", "CheckpointError", "ConfigError", "Engine", "FFNConfig", "Model", "ModelConfig",
    "Policy", "RopeScaling", "Tokenizer", "init", "load", "preset", "preset_names", "rewards",
]
