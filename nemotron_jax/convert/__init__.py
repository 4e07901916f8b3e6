"""Checkpoint conversion to and from Hugging Face."""

from nemotron_jax.convert.hf import read_hf_params, tensor_specs, write_hf

__all__ = ["read_hf_params", "tensor_specs", "write_hf"]
