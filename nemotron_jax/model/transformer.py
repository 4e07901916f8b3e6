"""The heterogeneous decoder: one `Block` per `BlockConfig`, built by following the config.

    x = embed(tokens)
    for block:  x = x + Attn(norm(x)) if attention;  x = x + FFN(norm(x)) if ffn
    logits = lm_head(norm(x))

Legend for array names: B batch, T tokens in this call, S cache slots, D hidden, V vocab,
N query heads, K KV heads, H head dim, F FFN width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax import kernels
from nemotron_jax.config import BlockConfig, ModelConfig
from nemotron_jax.model.attention import GQAttention, KVCache, LinearAttention
from nemotron_jax.model.ffn import LinearFFN, SwiGLU
from nemotron_jax.model.layers import RMSNorm, param
from nemotron_jax.sharding import constrain

Cache = list[KVCache | None]


@dataclasses.dataclass(frozen=True)
class Policy:
    """How the model computes, separate from what it is.

    `param_dtype` is how weights are stored; `compute_dtype` what matmuls run in (softmax, norms
    and logits stay float32). `scan_layers` scans runs of identical consecutive blocks (faster
    compiles for deep homogeneous stacks); `remat` is a `jax.checkpoint` policy name for training.
    """

    param_dtype: str = "float32"
    compute_dtype: str | None = None
    scan_layers: bool = False
    remat: str = "none"  # none | full | dots_saveable | ...any jax.checkpoint_policies name
    attention_impl: str = "xla"
    ffn_impl: str = "xla"

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype or self.param_dtype)


class Block(nnx.Module):
    """One layer: optional attention subblock, optional FFN subblock, each residual."""

    def __init__(self, cfg: ModelConfig, block: BlockConfig, policy: Policy, *, rngs: nnx.Rngs):
        pd = jnp.dtype(policy.param_dtype)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        att, ffn = block.attention, block.ffn
        attention: GQAttention | LinearAttention | None = None
        if att.kind == "gqa":
            attention = GQAttention(d, cfg.num_attention_heads, att.num_kv_heads, cfg.head_dim, eps,
                                    cfg.rope_inv_freq(), param_dtype=pd, rngs=rngs)
        elif att.kind == "linear":
            attention = LinearAttention(d, eps, param_dtype=pd, rngs=rngs)
        feed: SwiGLU | LinearFFN | None = None
        if ffn.kind == "swiglu":
            feed = SwiGLU(d, ffn.intermediate_size, eps, param_dtype=pd, rngs=rngs)
        elif ffn.kind == "linear":
            feed = LinearFFN(d, eps, param_dtype=pd, rngs=rngs)
        self.attention = nnx.data(attention)
        self.ffn = nnx.data(feed)
        self.attention_fn = kernels.attention_fn(policy.attention_impl)
        self.ffn_fn = kernels.ffn_fn(policy.ffn_impl)

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array | None,
                 cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        if self.attention is not None:
            out, cache = self.attention(x_BxTxD, positions_BxT, segment_ids_BxT, cache, self.attention_fn)
            x_BxTxD = constrain(x_BxTxD + out, ("batch", "seq", "act_embed"))
        if self.ffn is not None:
            x_BxTxD = constrain(x_BxTxD + self.ffn(x_BxTxD, self.ffn_fn), ("batch", "seq", "act_embed"))
        return x_BxTxD, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, policy: Policy = Policy(), *, rngs: nnx.Rngs):
        self.config, self.policy = cfg, policy
        pd = jnp.dtype(policy.param_dtype)
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, fan_in=1)
        self.layers = nnx.List([Block(cfg, b, policy, rngs=rngs) for b in cfg.blocks])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = nnx.data(None if cfg.tie_word_embeddings else param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd))

    def hidden_states(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                      segment_ids_BxT: jax.Array | None = None, cache: Cache | None = None,
                      ) -> tuple[jax.Array, Cache | None]:
        """The final-normed hidden states [B, T, D] (and the updated cache)."""
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.policy.dtype)
        x = constrain(x, ("batch", "seq", "act_embed"))
        new_cache: Cache | None = None if cache is None else []
        for start, stop in self._runs(cache is None):
            if stop - start > 1:
                x = self._scan_run(start, stop, x, positions_BxT, segment_ids_BxT)
                continue
            layer_cache = None if cache is None else cache[start]
            x, layer_cache = self._apply(self.layers[start], x, positions_BxT, segment_ids_BxT, layer_cache)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.final_norm(x), new_cache

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None, cache: Cache | None = None,
                 ) -> tuple[jax.Array, Cache | None]:
        """Logits [B, T, V] in float32 (and the updated cache when one is given)."""
        h, cache = self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT, cache)
        return self.project(h), cache

    def project(self, h_BxTxD: jax.Array) -> jax.Array:
        """Hidden states -> float32 logits through the LM head (or the tied embedding)."""
        head_DxV = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("btd,dv->btv", h_BxTxD, head_DxV.astype(h_BxTxD.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab"))

    def init_cache(self, batch: int, max_len: int, dtype: str = "bfloat16") -> Cache:
        """Zeros for every GQA layer, shaped by that layer's own KV heads; None for the others."""
        cache: Cache = []
        for layer in self.layers:
            att = layer.attention
            if isinstance(att, GQAttention):
                shape = (batch, max_len, att.num_kv_heads, att.head_dim)
                cache.append(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
            else:
                cache.append(None)
        return cache

    # ---------------------------------------------------------------- internals
    def _remat_policy(self) -> Any:
        return None if self.policy.remat == "full" else getattr(jax.checkpoint_policies, self.policy.remat)

    def _apply(self, block: Block, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        """Run one block, under `jax.checkpoint` when a remat policy is set."""
        if self.policy.remat == "none":
            return block(x, positions, segment_ids, cache)
        graphdef, state = nnx.split(block)

        def pure(state, x, positions, segment_ids, cache):
            return nnx.merge(graphdef, state)(x, positions, segment_ids, cache)

        return jax.checkpoint(pure, policy=self._remat_policy())(state, x, positions, segment_ids, cache)

    def _runs(self, allow_scan: bool) -> list[tuple[int, int]]:
        """[start, stop) ranges: runs of identical blocks when scanning, else single layers."""
        blocks = self.config.blocks
        runs, start = [], 0
        for i in range(1, len(blocks) + 1):
            if i == len(blocks) or not (allow_scan and self.policy.scan_layers and blocks[i] == blocks[start]):
                runs.append((start, i))
                start = i
        return runs

    def _scan_run(self, start: int, stop: int, x: jax.Array, positions: jax.Array,
                  segment_ids: jax.Array | None) -> jax.Array:
        """lax.scan over a run of identical blocks, their weights stacked on a leading axis."""
        graphdef, first = nnx.split(self.layers[start])
        states = [first] + [nnx.state(self.layers[i]) for i in range(start + 1, stop)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

        def body(x, state):
            block = nnx.merge(graphdef, state)
            return block(x, positions, segment_ids, None)[0], None

        if self.policy.remat != "none":
            body = jax.checkpoint(body, policy=self._remat_policy())
        return jax.lax.scan(body, x, stacked)[0]
