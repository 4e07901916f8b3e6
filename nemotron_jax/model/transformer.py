"""The heterogeneous decoder: one `Block` per `BlockConfig`, built by following the config.

    x = embed(tokens)
    for block:  x = x + Attn(norm(x)) if attention;  x = x + FFN(norm(x)) if ffn
    logits = lm_head(norm(x))

A block is its two residual halves, `Block.attend` and `Block.feed`; `Transformer.capture` returns
every layer's input and mid-block state and `Transformer.logits_from` runs the stack from any
layer, so Puzzle reads and replays the parent through this one implementation.

Legend for array names: B batch, T tokens in this call, S cache slots, D hidden, V vocab,
N query heads, K KV heads, H head dim, F FFN width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax import kernels
from nemotron_jax.config import BlockConfig, ModelConfig
from nemotron_jax.model.attention import GQAttention, KVCache, LinearAttention
from nemotron_jax.model.ffn import LinearFFN, SwiGLU
from nemotron_jax.model.layers import RMSNorm, param
from nemotron_jax.sharding import constrain

Cache = list[KVCache | None]  # one entry per group of `Transformer._runs` (see `init_cache`)


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
        mid_BxTxD, cache = self.attend(x_BxTxD, positions_BxT, segment_ids_BxT, cache)
        return self.feed(mid_BxTxD), cache

    def attend(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array | None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """The first residual half, mid = x + Attn(x) (x itself without attention), and the cache."""
        if self.attention is None:
            return x_BxTxD, cache
        out_BxTxD, cache = self.attention(x_BxTxD, positions_BxT, segment_ids_BxT, cache, self.attention_fn)
        return constrain(x_BxTxD + out_BxTxD, ("batch", "seq", "act_embed")), cache

    def feed(self, mid_BxTxD: jax.Array) -> jax.Array:
        """The second residual half, mid + FFN(mid) (mid itself without an FFN)."""
        if self.ffn is None:
            return mid_BxTxD
        return constrain(mid_BxTxD + self.ffn(mid_BxTxD, self.ffn_fn), ("batch", "seq", "act_embed"))


class Capture(NamedTuple):
    """The parent's states per layer, what Puzzle builds, trains and scores candidates against:
    `inputs[i]` enters block i, `mids[i]` = inputs[i] + Attn(inputs[i]), and `final` leaves the
    last block (before the final norm)."""

    inputs: list[jax.Array]
    mids: list[jax.Array]
    final: jax.Array


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
        positions_BxT = _default_positions(tokens_BxT, positions_BxT)
        x, cache = self.run_layers(self.embed_tokens(tokens_BxT), positions_BxT, segment_ids_BxT, cache)
        return self.final_norm(x), cache

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        """The state entering layer 0: embeddings [B, T, D] in the compute dtype."""
        x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.policy.dtype)
        return constrain(x, ("batch", "seq", "act_embed"))

    def run_layers(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None,
                   cache: Cache | None = None, start: int = 0) -> tuple[jax.Array, Cache | None]:
        """Layers `start`.. on the state entering layer `start`: the state after the last block
        (before the final norm) and the updated cache of those layers, one entry per group of
        `_runs(start)` (a layer; under `scan_layers` a run of identical layers, stacked)."""
        if not 0 <= start <= len(self.layers):
            raise ValueError(f"start={start} outside the {len(self.layers)} layers")
        new_cache: Cache | None = None if cache is None else []
        for g, (first, stop) in enumerate(self._runs(start)):
            group_cache = None if cache is None else cache[g]
            if stop - first > 1:
                x_BxTxD, group_cache = self._scan_run(first, stop, x_BxTxD, positions_BxT, segment_ids_BxT,
                                                      group_cache)
            else:
                x_BxTxD, group_cache = self._apply(self.layers[first], x_BxTxD, positions_BxT, segment_ids_BxT,
                                                   group_cache)
            if new_cache is not None:
                new_cache.append(group_cache)
        return x_BxTxD, new_cache

    def logits_from(self, start: int, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                    segment_ids_BxT: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, T, V] from the state entering layer `start` (`num_layers`: the head only);
        how Puzzle scores a child that differs from the parent only before `start`."""
        x_BxTxD, _ = self.run_layers(x_BxTxD, positions_BxT, segment_ids_BxT, start=start)
        return self.project(self.final_norm(x_BxTxD))

    def capture(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                segment_ids_BxT: jax.Array | None = None) -> Capture:
        """Every layer's input and mid-block state, and the final pre-norm state (no cache).

        Runs the blocks one by one through `Block.attend` / `Block.feed` (the halves of
        `Block.__call__`), also under `scan_layers`, and without remat: it is for activations,
        not gradients. Works under jit."""
        positions_BxT = _default_positions(tokens_BxT, positions_BxT)
        x = self.embed_tokens(tokens_BxT)
        inputs, mids = [], []
        for block in self.layers:
            inputs.append(x)
            mid, _ = block.attend(x, positions_BxT, segment_ids_BxT)
            mids.append(mid)
            x = block.feed(mid)
        return Capture(inputs, mids, x)

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
        """Zeros for every GQA layer, shaped by that layer's own KV heads; None for the others.

        One entry per group of `_runs()`: a layer's [B, S, K, H] arrays or, for a run of L
        identical layers under `scan_layers`, the run's caches stacked to [L, B, S, K, H], so the
        scan carries them in place."""
        cache: Cache = []
        for first, stop in self._runs():
            att = self.layers[first].attention
            if isinstance(att, GQAttention):
                stack = (stop - first,) if stop - first > 1 else ()
                shape = (*stack, batch, max_len, att.num_kv_heads, att.head_dim)
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

    def _runs(self, first: int = 0) -> list[tuple[int, int]]:
        """[start, stop) ranges from layer `first`: runs of identical blocks under `scan_layers`,
        else single layers. The cache follows these groups."""
        blocks = self.config.blocks
        runs, start = [], first
        for i in range(first + 1, len(blocks) + 1):
            if i == len(blocks) or not (self.policy.scan_layers and blocks[i] == blocks[start]):
                runs.append((start, i))
                start = i
        return runs

    def _scan_run(self, start: int, stop: int, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                  cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        """lax.scan over a run of identical blocks, their weights stacked on a leading axis; the
        run's stacked cache [L, B, S, K, H] rides in the carry and layer i updates slice i in place.

        The weights are stored per layer (`layers.<i>` paths) and stacked here, inside the traced
        step: XLA materialises that stacked copy (see docs/scale.md, "scan_layers at scale")."""
        graphdef, first = nnx.split(self.layers[start])
        states = [first] + [nnx.state(self.layers[i]) for i in range(start + 1, stop)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

        def body(carry, xs):
            x, cache = carry
            state, i = xs
            layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], cache)
            x, layer_cache = nnx.merge(graphdef, state)(x, positions, segment_ids, layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0),
                                     cache, layer_cache)
            return (x, cache), None

        if self.policy.remat != "none":
            body = jax.checkpoint(body, policy=self._remat_policy())
        return jax.lax.scan(body, (x, cache), (stacked, jnp.arange(stop - start)))[0]


def _default_positions(tokens_BxT: jax.Array, positions_BxT: jax.Array | None) -> jax.Array:
    if positions_BxT is None:
        return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    return positions_BxT
