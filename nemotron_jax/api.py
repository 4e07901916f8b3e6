"""The user's handle: `Model` (a config plus its weights), `init` and `load`.

It sits above everything it fronts (the model, the sampler, checkpoints, HF conversion) and adds
no computation of its own: the heavy lifting is pure (`model.forward.forward`, the sampler),
jitted once per shape with the weights as an argument; `Model` holds the weights and converts
inputs and outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax import lora
from nemotron_jax.checkpoint import restore_params, save_params
from nemotron_jax.config import ModelConfig
from nemotron_jax.convert.hf import read_hf_params, write_hf
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.fileio import atomic_dir
from nemotron_jax.lora import LoRAConfig
from nemotron_jax.model.forward import forward
from nemotron_jax.model.params import abstract_model, assemble, flat_params, init_sharded, param_shardings
from nemotron_jax.model.transformer import Policy, Transformer
from nemotron_jax.presets import SAVED_CONFIG, read_saved_config, resolve_config
from nemotron_jax.quantize import quantize_module
from nemotron_jax.sampling import generate
from nemotron_jax.sharding import Layout, use_layout

_DTYPES = ("float32", "bfloat16")


class Model:
    """A Nemotron-NAS model: `config`, weights, and the operations users call."""

    def __init__(self, module: Transformer, layout: Layout | None = None):
        self.module = module
        self.layout = layout

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    @property
    def policy(self) -> Policy:
        return self.module.policy

    def split(self) -> tuple[nnx.GraphDef, nnx.State]:
        return nnx.split(self.module)

    def logits(self, tokens: Any, positions: Any = None, segment_ids: Any = None) -> np.ndarray:
        """Float32 logits [B, T, vocab] for int tokens [B, T] (a 1-D sequence is treated as B=1)."""
        tokens = _as_tokens(tokens, self.config.vocab_size)
        squeeze = tokens.ndim == 1
        tokens = tokens[None] if squeeze else tokens
        positions = None if positions is None else jnp.asarray(positions, jnp.int32).reshape(tokens.shape)
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32).reshape(tokens.shape)
        graphdef, state = self.split()
        with use_layout(self.layout):
            out = forward(graphdef, state, jnp.asarray(tokens), positions, segment_ids)
        out = np.asarray(out)
        return out[0] if squeeze else out

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, stop_tokens: list[int] | None = None, return_logprobs: bool = False,
                 **options: Any) -> Any:
        """New-token lists, one per prompt (see `nemotron_jax.sampling.stream` for `options`:
        max_thinking_tokens, think_tokens, cache_dtype, cache_len). `stop_tokens` None: the
        config's eos ids; []: never stop early. With `return_logprobs`: (tokens, logprobs)."""
        out = generate(*self.split(), prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       seed=seed, stop_tokens=stop_tokens, return_logprobs=return_logprobs, layout=self.layout,
                       **options)
        return (out.tokens, out.logprobs) if return_logprobs else out.tokens

    def save(self, path: str | Path) -> None:
        """Orbax parameters plus `model_config.json`, written to a temp dir and renamed into place."""
        if lora.has_adapters(self.module):
            raise ValueError("the model has LoRA adapters, which `save` would drop: write them with "
                             "save_adapters(dir), or save merge_adapters()")
        with atomic_dir(path) as tmp:
            if jax.process_index() == 0:
                (tmp / SAVED_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            save_params(tmp / "params", flat_params(self.module))

    def save_hf(self, path: str | Path, format: Literal["decilm", "llama"] = "decilm",
                tokenizer: Any = None) -> None:
        """A Hugging Face checkpoint (config.json + safetensors) in the parameter dtype, with
        generation_config.json, and given a `Tokenizer` (or its path, or "tiny") its files with the
        chat template in use: one directory renamed into place whole (see convert/hf_files.py)."""
        from nemotron_jax.convert.hf_files import export_writer
        from nemotron_jax.tokenizer import Tokenizer

        if lora.has_adapters(self.module):
            raise ValueError("the model has LoRA adapters, which an HF export of the base would drop: export "
                             "merge_adapters(), or write the adapters with save_adapters(dir) (PEFT format)")
        cfg = self.config.replace(torch_dtype=self.policy.param_dtype)
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(tokenizer)
        write_hf(path, cfg, flat_params(self.module), format, extra=export_writer(cfg, format, tokenizer))

    # ------------------------------------------------------------ LoRA and quantization (lora.py, quantize.py)
    def add_adapters(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                     targets: tuple[str, ...] | None = None, seed: int = 0) -> Model:
        """Attach fresh LoRA adapters (B = 0: outputs unchanged) in place; returns self."""
        cfg = LoRAConfig(rank, alpha, dropout) if targets is None else LoRAConfig(rank, alpha, dropout, tuple(targets))
        lora.add_adapters(self.module, cfg, seed, self.layout)
        return self

    @property
    def has_adapters(self) -> bool:
        return lora.has_adapters(self.module)

    def save_adapters(self, path: str | Path) -> None:
        """The adapters as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
        lora.save_peft(self.module, path)

    def merge_adapters(self) -> Model:
        """A plain model computing what this one does with its adapters (W + (alpha/r)·A·B)."""
        return Model(lora.merge(self.module), self.layout)

    def quantize(self, bits: str) -> Model:
        """A model whose projection weights are stored int8 (per channel) or int4 (groups of 128)."""
        return Model(quantize_module(self.module, bits), self.layout)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.num_layers} blocks, hidden {c.hidden_size}, {c.num_params():,} params, "
                f"{self.policy.param_dtype})")


def _as_tokens(tokens: Any, vocab: int) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise ValueError(f"tokens must be a non-empty [B, T] (or [T]) array, got shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32)


def _policy(dtype: str, compute_dtype: str | None = None, **options: Any) -> Policy:
    for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if value is not None and value not in _DTYPES:
            raise ConfigError(f"{name} must be one of {_DTYPES}, got {value!r}")
    return Policy(param_dtype=dtype, compute_dtype=compute_dtype, **options)


def init(cfg: ModelConfig | str, seed: int = 0, dtype: str = "float32", *, compute_dtype: str | None = None,
         layout: Layout | None = None, **options: Any) -> Model:
    """A freshly initialised model, each weight created directly in its shard.

    `cfg` may be a `ModelConfig` or anything `resolve_config` accepts (a preset name, a path).
    `options`: `scan_layers`, `remat`, `attention_impl`, `ffn_impl` (see `Policy`).
    """
    cfg = cfg if isinstance(cfg, ModelConfig) else resolve_config(cfg)
    policy = _policy(dtype, compute_dtype, **options)
    return Model(init_sharded(cfg, policy, seed, layout), layout)


def load(path: str | Path, dtype: str = "float32", quantize: str | None = None, *, adapters: str | Path | None = None,
         compute_dtype: str | None = None, layout: Layout | None = None, **options: Any) -> Model:
    """A model from an HF directory (DeciLM or Llama layout) or a directory written by `Model.save`.

    `quantize` ("int8" | "int4") stores the projections quantized (weight-only); `adapters` attaches
    a LoRA adapter directory (ours, or a PEFT adapter saved by PyTorch users)."""
    model = _load(path, dtype, compute_dtype=compute_dtype, layout=layout, **options)
    if quantize is not None:
        model = model.quantize(quantize)
    if adapters is not None:
        lora.load_adapters(model.module, adapters, layout)
    return model


def _load(path: str | Path, dtype: str = "float32", *, compute_dtype: str | None = None,
          layout: Layout | None = None, **options: Any) -> Model:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory")
    policy = _policy(dtype, compute_dtype, **options)
    saved = (path / SAVED_CONFIG).is_file()
    cfg = read_saved_config(path) if saved else ModelConfig.from_hf(path)
    abstract = abstract_model(cfg, policy)
    shardings = param_shardings(abstract, layout)
    if saved:
        shapes = {p: jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype), sharding=shardings[p])
                  for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
        flat = restore_params(path / "params", shapes)
    else:
        flat = read_hf_params(path, cfg, shardings, jnp.dtype(dtype))
    return Model(assemble(cfg, policy, flat), layout)

