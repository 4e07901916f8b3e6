"""Subblocks as data: a variant (an `AttentionConfig` or `FFNConfig`) plus a flat weight dict.

Puzzle handles every candidate as one residual *subblock*: an attention subblock maps the block
input x to its delta Attn(norm(x)); an FFN subblock maps the mid-block state m = x + Attn(..) to
FFN(norm(m)). Weights are flat dicts keyed by the path inside the model's own module
(`("q",)`, `("norm", "weight")`, ...), so a chosen variant drops into `("layers", i, "attention",
*path)` of the child unchanged, and the candidates run as the model's own `Block` (`block_for`):
there is no second implementation of a block here. The parent's per-layer states come from
`Transformer.capture`, and the layers after a candidate run through `Transformer.logits_from`.
Variant names are the `key` spelling of the block grammar in `nemotron_jax.config`.

Legend: B batch, T tokens, D hidden, L layers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.config import AttentionConfig, BlockConfig, FFNConfig, ModelConfig, format_subblock, parse_subblock
from nemotron_jax.model.transformer import Block, Policy

Variant = AttentionConfig | FFNConfig
SubPath = tuple[str, ...]
SubParams = dict[SubPath, Any]
NO_ATTENTION, NO_FFN = AttentionConfig("none"), FFNConfig("none")


def kind_of(variant: Variant) -> str:
    """'attention' or 'ffn': the subblock slot a variant fills."""
    return "attention" if isinstance(variant, AttentionConfig) else "ffn"


def variant_name(variant: Variant) -> str:
    """A short name safe as a file/Orbax key (the grammar's `key` spelling): gqa8, swiglu768, linear, none."""
    return format_subblock(variant, "key")


def variant_from_name(kind: str, name: str) -> Variant:
    """Inverse of `variant_name` for slot `kind` (any spelling of the grammar is read)."""
    return parse_subblock(kind, name)


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
def _graph(key: ModelConfig, block: BlockConfig) -> tuple[nnx.GraphDef, tuple[tuple[SubPath, Any], ...]]:
    """The graph and abstract weights of the model's own `Block` for `block` (paths start with
    the slot, e.g. ("attention", "q"))."""
    abstract = nnx.eval_shape(lambda: Block(key, block, Policy(), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, tuple((tuple(str(p) for p in path), v) for path, v in nnx.to_flat_state(state))


def param_shapes(cfg: ModelConfig, variant: Variant) -> dict[SubPath, tuple[int, ...]]:
    """Path -> shape of every weight of the variant (empty for no-op)."""
    _, abstract = _graph(model_key(cfg), block_with(plain_variant(variant)))
    return {p[1:]: tuple(v.shape) for p, v in abstract}


def block_for(cfg: ModelConfig, block: BlockConfig, params: dict[str, SubParams]) -> Block:
    """The model's own `Block` of `block` holding exactly `params` ({"attention": .., "ffn": ..},
    each a flat subblock weight dict; a no-op slot needs none). Works under jit."""
    block = BlockConfig(block.attention, plain_variant(block.ffn))
    graphdef, abstract = _graph(model_key(cfg), block)
    missing = [path for path, _ in abstract if path[1:] not in params.get(path[0], {})]
    if missing:
        raise KeyError(f"{format_subblock(block.attention)} {format_subblock(block.ffn)}: missing weights {missing}")
    state = nnx.from_flat_state([(path, v.replace(jnp.asarray(params[path[0]][path[1:]]))) for path, v in abstract])
    return nnx.merge(graphdef, state)


def module_for(cfg: ModelConfig, variant: Variant, params: SubParams) -> nnx.Module | None:
    """The model's own subblock module holding exactly `params` (None for no-op); works under jit."""
    block = block_for(cfg, block_with(variant), {kind_of(variant): params})
    return block.attention if isinstance(variant, AttentionConfig) else block.ffn


def apply(cfg: ModelConfig, variant: Variant, params: SubParams, x_BxTxD: jax.Array, positions_BxT: jax.Array,
          segment_ids_BxT: jax.Array | None) -> jax.Array:
    """The subblock's residual delta for input x (zeros for no-op): what BLD trains towards the
    parent's delta. Runs the subblock module of the model's own `Block`, with that block's kernels."""
    block = block_for(cfg, block_with(variant), {kind_of(variant): params})
    if isinstance(variant, AttentionConfig):
        if block.attention is None:
            return jnp.zeros_like(x_BxTxD)
        return block.attention(x_BxTxD, positions_BxT, segment_ids_BxT, None, block.attention_fn)[0]
    return jnp.zeros_like(x_BxTxD) if block.ffn is None else block.ffn(x_BxTxD, block.ffn_fn)


def block_params(flat: dict[tuple, Any], layer: int, kind: str) -> SubParams:
    """One subblock's weights out of a model's flat param dict."""
    n = 3
    return {tuple(str(p) for p in path[n:]): v for path, v in flat.items()
            if len(path) > n and path[:3] == ("layers", layer, kind)}


def parent_variants(cfg: ModelConfig, layer: int) -> tuple[Variant, Variant]:
    b = cfg.blocks[layer]
    return b.attention, plain_variant(b.ffn)


def to_numpy(params: SubParams) -> dict[SubPath, np.ndarray]:
    return {p: np.asarray(v) for p, v in params.items()}
