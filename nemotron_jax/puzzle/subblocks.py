"""Subblocks as data: a variant (an `AttentionConfig` or `FFNConfig`) plus a flat weight dict.

Puzzle handles every candidate as one residual *subblock*: an attention subblock maps the block
input x to its delta Attn(norm(x)); an FFN subblock maps the mid-block state m = x + Attn(..) to
FFN(norm(m)). Weights are flat dicts keyed by the path inside the model's own module
(`("q",)`, `("norm", "weight")`, ...), so a chosen variant drops into `("layers", i, "attention",
*path)` of the child unchanged, and the candidates run through the very modules the model uses.

Legend: B batch, T tokens, D hidden, L layers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.config import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from nemotron_jax.model.transformer import Block, Policy, Transformer

Variant = AttentionConfig | FFNConfig
SubPath = tuple[str, ...]
SubParams = dict[SubPath, Any]
NO_ATTENTION, NO_FFN = AttentionConfig("none"), FFNConfig("none")


def kind_of(variant: Variant) -> str:
    """'attention' or 'ffn': the subblock slot a variant fills."""
    return "attention" if isinstance(variant, AttentionConfig) else "ffn"


def variant_name(variant: Variant) -> str:
    """A short name safe as a file/Orbax key: gqa8, linear, none; swiglu768, linear, none."""
    if isinstance(variant, AttentionConfig):
        return f"gqa{variant.num_kv_heads}" if variant.kind == "gqa" else variant.kind
    return f"swiglu{variant.intermediate_size}" if variant.kind == "swiglu" else variant.kind


def variant_from_name(kind: str, name: str) -> Variant:
    if kind == "attention":
        return AttentionConfig("gqa", int(name[3:])) if name.startswith("gqa") else AttentionConfig(name)
    return FFNConfig("swiglu", int(name[6:])) if name.startswith("swiglu") else FFNConfig(name)


def plain_variant(variant: Variant) -> Variant:
    """The variant without bookkeeping fields (an FFN's remembered `ffn_mult`)."""
    return FFNConfig(variant.kind, variant.intermediate_size) if isinstance(variant, FFNConfig) else variant


def block_with(variant: Variant) -> BlockConfig:
    """A block holding only this subblock (the other one no-op)."""
    return BlockConfig(variant, NO_FFN) if isinstance(variant, AttentionConfig) else BlockConfig(NO_ATTENTION, variant)


def model_key(cfg: ModelConfig) -> ModelConfig:
    """The config fields a subblock depends on (blocks dropped), hashable for caching."""
    return cfg.replace(blocks=(BlockConfig(NO_ATTENTION, NO_FFN),), vocab_size=0, tie_word_embeddings=True)


@functools.lru_cache(maxsize=256)
def _graph(key: ModelConfig, variant: Variant) -> tuple[nnx.GraphDef, tuple[tuple[SubPath, Any], ...]] | None:
    if variant.kind == "none":
        return None
    abstract = nnx.eval_shape(lambda: Block(key, block_with(variant), Policy(), rngs=nnx.Rngs(0)))
    module = abstract.attention if isinstance(variant, AttentionConfig) else abstract.ffn
    graphdef, state = nnx.split(module)
    return graphdef, tuple((tuple(str(p) for p in path), v) for path, v in nnx.to_flat_state(state))


def param_shapes(cfg: ModelConfig, variant: Variant) -> dict[SubPath, tuple[int, ...]]:
    """Path -> shape of every weight of the variant (empty for no-op)."""
    graph = _graph(model_key(cfg), plain_variant(variant))
    return {} if graph is None else {p: tuple(v.shape) for p, v in graph[1]}


def module_for(cfg: ModelConfig, variant: Variant, params: SubParams) -> nnx.Module | None:
    """The model's own subblock module holding exactly `params` (None for no-op); works under jit."""
    graph = _graph(model_key(cfg), plain_variant(variant))
    if graph is None:
        return None
    graphdef, abstract = graph
    missing = [p for p, _ in abstract if p not in params]
    if missing:
        raise KeyError(f"{variant_name(variant)}: missing weights {missing}")
    state = nnx.from_flat_state([(p, v.replace(jnp.asarray(params[p]))) for p, v in abstract])
    return nnx.merge(graphdef, state)


def apply(cfg: ModelConfig, variant: Variant, params: SubParams, x_BxTxD: jax.Array, positions_BxT: jax.Array,
          segment_ids_BxT: jax.Array | None) -> jax.Array:
    """The subblock's residual delta for input x (zeros for no-op)."""
    module = module_for(cfg, variant, params)
    if module is None:
        return jnp.zeros_like(x_BxTxD)
    if isinstance(variant, AttentionConfig):
        return module(x_BxTxD, positions_BxT, segment_ids_BxT, None)[0]
    return module(x_BxTxD)


def block_params(flat: dict[tuple, Any], layer: int, kind: str) -> SubParams:
    """One subblock's weights out of a model's flat param dict."""
    n = 3
    return {tuple(str(p) for p in path[n:]): v for path, v in flat.items()
            if len(path) > n and path[:3] == ("layers", layer, kind)}


def parent_variants(cfg: ModelConfig, layer: int) -> tuple[Variant, Variant]:
    b = cfg.blocks[layer]
    return b.attention, plain_variant(b.ffn)


# ---------------------------------------------------------------- the parent's activations
def run_block(block: Block, x_BxTxD: jax.Array, positions_BxT: jax.Array,
              segment_ids_BxT: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(mid, out) of one block: mid = x + Attn(x), out = mid + FFN(mid) (no-op parts skipped)."""
    mid = x_BxTxD
    if block.attention is not None:
        mid = x_BxTxD + block.attention(x_BxTxD, positions_BxT, segment_ids_BxT, None)[0]
    out = mid if block.ffn is None else mid + block.ffn(mid)
    return mid, out


def capture(model: Transformer, tokens_BxT: jax.Array, positions_BxT: jax.Array,
            segment_ids_BxT: jax.Array | None) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """Per layer the block input and the mid-block state, and the final (pre-norm) state."""
    x = jnp.take(model.embed[...], tokens_BxT, axis=0).astype(model.policy.dtype)
    inputs, mids = [], []
    for block in model.layers:
        inputs.append(x)
        mid, x = run_block(block, x, positions_BxT, segment_ids_BxT)
        mids.append(mid)
    return inputs, mids, x


def run_tail(model: Transformer, start: int, x_BxTxD: jax.Array, positions_BxT: jax.Array,
             segment_ids_BxT: jax.Array | None) -> jax.Array:
    """Logits [B, T, V] from the state entering layer `start` (layers start.. of `model`)."""
    for block in list(model.layers)[start:]:
        x_BxTxD = run_block(block, x_BxTxD, positions_BxT, segment_ids_BxT)[1]
    return model.project(model.final_norm(x_BxTxD))


def to_numpy(params: SubParams) -> dict[SubPath, np.ndarray]:
    return {p: np.asarray(v) for p, v in params.items()}
