"""The engine's jitted device work: a prefill chunk and a run of decode steps over the paged cache.

Both run the model's own modules layer by layer (`Block.attend` / `Block.feed`, the GQA module's
own projections, RoPE and LoRA adapters); only the attention call is swapped, through the module's
`attention_fn` argument, for one that scatters the new keys/values into their pages and attends
over the row's pages. The pools are donated, so the scatter updates them in place: no step copies
the cache. Shapes are the bucket's (rows, tokens, page-table entries); every per-request value
(token, position, seed, sampling knobs, stop ids, think budget) is a traced array, so a steady
stream of requests reuses the compiled programs (`TRACES` counts traces).

Sampling reuses `sampling.logits_processing` (truncation, raw log-probs) and `sampling.think`
(the reasoning budget); each row's key is `fold_in(fold_in(key(seed), sample_index), token_index)`,
so its draws never depend on its batch-mates.

Legend: B rows, C tokens per row in a prefill chunk, M page-table entries per row, D hidden,
V vocabulary, W think window, E stop ids per row, R decode steps in one call; pools as in pages.py.
"""

from __future__ import annotations

import collections
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.engine.pages import POOL_AXES, SCRATCH, Geometry
from nemotron_jax.kernels.paged_attention import paged_attention
from nemotron_jax.model.transformer import Transformer
from nemotron_jax.sampling import think as think_lib
from nemotron_jax.sampling.logits_processing import token_logprobs, truncate_logits
from nemotron_jax.sharding import Layout, constrain, use_layout

TRACES: collections.Counter[str] = collections.Counter()
Pools = list[tuple[jax.Array, jax.Array]]

# Columns of the per-row int32 inputs of `decode`.
LAST, POS, NUM_NEW, MAX_NEW, ACTIVE, SEED, STREAM, TOP_K, BUDGET, SLOT, FRESH = range(11)
NUM_INTS = 11
TEMP, TOP_P = range(2)  # columns of the float32 inputs


class Flags(NamedTuple):
    """Static code-path choices of a decode call (part of the compile key)."""

    sampling: bool  # some row samples (temperature > 0); else argmax only
    truncate: bool  # some sampling row uses top-k / top-p
    think: bool  # some row has a reasoning budget


def paged_forward(model: Transformer, geometry: Geometry, tokens_BxC: jax.Array, positions_BxC: jax.Array,
                  write_page_BxC: jax.Array, table_BxM: jax.Array, pools: Pools, impl: str,
                  ) -> tuple[jax.Array, Pools]:
    """Final-normed hidden states [B, C, D] and the pools with this call's keys/values written."""
    page_size = pools[0][0].shape[2] if pools else 1
    offset_BxC = positions_BxC % page_size
    pools = list(pools)
    x = model.embed_tokens(tokens_BxC)
    for i, block in enumerate(model.layers):
        where = geometry.slot[i]
        if where is None:
            x, _ = block.attend(x, positions_BxC, None)
        else:
            pool, layer = where
            written: list = []

            def attend(q, k, v, *_, pool=pool, layer=layer, written=written):
                kp, vp = pools[pool]
                kp = constrain(kp.at[layer, write_page_BxC, offset_BxC].set(k.astype(kp.dtype)), POOL_AXES)
                vp = constrain(vp.at[layer, write_page_BxC, offset_BxC].set(v.astype(vp.dtype)), POOL_AXES)
                written.append((kp, vp))
                return paged_attention(q, kp, vp, positions_BxC, table_BxM, layer,
                                       impl=impl if q.shape[1] == 1 else "xla")

            out, _ = block.attention(x, positions_BxC, None, None, attend)
            pools[pool] = written[0]
            x = constrain(x + out, ("batch", "seq", "act_embed"))
        x = block.feed(x)
    return model.final_norm(x), pools


def _write_pages(table_BxM: jax.Array, positions_BxC: jax.Array, valid_BxC: jax.Array, pools: Pools) -> jax.Array:
    """The page each new key goes to: its row's table entry, or the scratch page when not valid."""
    entries = table_BxM.shape[1]
    idx_BxC = positions_BxC // (pools[0][0].shape[2] if pools else 1)
    ok_BxC = valid_BxC & (idx_BxC < entries)
    page_BxC = jnp.take_along_axis(table_BxM, jnp.clip(idx_BxC, 0, entries - 1), axis=1)
    return jnp.where(ok_BxC, page_BxC, SCRATCH)


@partial(jax.jit, static_argnames=("graphdef", "geometry", "impl", "layout"), donate_argnames=("pools",))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, pools: Pools, tokens_BxC: jax.Array,
            positions_BxC: jax.Array, valid_BxC: jax.Array, table_BxM: jax.Array, *, geometry: Geometry,
            impl: str = "xla", layout: Layout | None = None) -> Pools:
    """Write the keys/values of one chunk of prompt tokens per row into its pages (no logits:
    the last known token of every sequence is fed by its first decode step)."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    with use_layout(layout):
        page_BxC = _write_pages(table_BxM, positions_BxC, valid_BxC, pools)
        _, pools = paged_forward(model, geometry, tokens_BxC, positions_BxC, page_BxC, table_BxM, pools, impl)
    return pools


def _pick(logits_BxV: jax.Array, keys_B: jax.Array, temp_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
          flags: Flags) -> jax.Array:
    """Each row's next token: argmax when its temperature is 0, else a draw from its own knobs."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    if not flags.sampling:
        return greedy_B
    scaled_BxV = logits_BxV / jnp.maximum(temp_B, 1e-6)[:, None]
    if flags.truncate:
        cut_BxV = truncate_logits(scaled_BxV, top_k_B[:, None], top_p_B[:, None])
        scaled_BxV = jnp.where(((top_k_B > 0) | (top_p_B < 1.0))[:, None], cut_BxV, scaled_BxV)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)
    return jnp.where(temp_B > 0, drawn_B, greedy_B)


class _Carry(NamedTuple):
    i: jax.Array
    pools: Pools
    last_B: jax.Array
    pos_B: jax.Array
    num_new_B: jax.Array
    done_B: jax.Array
    think: think_lib.ThinkState | None
    tokens_BxR: jax.Array
    logprobs_BxR: jax.Array


@partial(jax.jit, static_argnames=("graphdef", "geometry", "steps", "flags", "impl", "layout"),
         donate_argnames=("pools", "think"))
def decode(graphdef: nnx.GraphDef, state: nnx.State, pools: Pools, think: think_lib.ThinkState | None,
           ints_BxI: jax.Array, floats_Bx2: jax.Array, stops_BxE: jax.Array, table_BxM: jax.Array,
           window_BxW: jax.Array | None, think_arrays: think_lib.ThinkArrays | None, *, geometry: Geometry,
           steps: int, flags: Flags, impl: str = "xla", layout: Layout | None = None,
           ) -> tuple[Pools, think_lib.ThinkState | None, jax.Array, jax.Array]:
    """Up to `steps` decode steps for every active row; returns the pools, the per-slot think state
    and the emitted tokens / raw log-probs [B, R] (-1 / 0 where a row emitted nothing)."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    col = lambda j: ints_BxI[:, j]
    active_B, max_new_B, budget_B, slot_B = col(ACTIVE) > 0, col(MAX_NEW), col(BUDGET), col(SLOT)
    base_B = jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(col(SEED), col(STREAM))
    rows_think = None
    if flags.think:
        gathered = jax.tree.map(lambda a: a[slot_B], think)
        fresh = think_lib.init_state(window_BxW, think_arrays)
        fresh_B = col(FRESH) > 0
        rows_think = jax.tree.map(lambda f, g: jnp.where(fresh_B.reshape((-1,) + (1,) * (g.ndim - 1)), f, g),
                                  fresh, gathered)
    b = ints_BxI.shape[0]

    def cond(c: _Carry) -> jax.Array:
        return (c.i < steps) & jnp.any(active_B & ~c.done_B)

    def body(c: _Carry) -> _Carry:
        emit_B = active_B & ~c.done_B
        with use_layout(layout):
            page_B = _write_pages(table_BxM, c.pos_B[:, None], emit_B[:, None], c.pools)
            h_Bx1xD, pools = paged_forward(model, geometry, c.last_B[:, None], c.pos_B[:, None], page_B,
                                           table_BxM, c.pools, impl)
            logits_BxV = model.project(h_Bx1xD)[:, 0]
        keys_B = jax.vmap(jax.random.fold_in)(base_B, c.num_new_B)
        token_B = _pick(logits_BxV, keys_B, floats_Bx2[:, TEMP], col(TOP_K), floats_Bx2[:, TOP_P], flags)
        th = c.think
        if flags.think:
            token_B = think_lib.choose(th, token_B, think_arrays)
            adv = think_lib.advance(th, token_B, budget_B, think_arrays)
            th = jax.tree.map(lambda n, o: jnp.where(emit_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), adv, th)
        num_new_B = c.num_new_B + emit_B.astype(jnp.int32)
        stop_B = (token_B[:, None] == stops_BxE).any(-1)
        done_B = c.done_B | (emit_B & (stop_B | (num_new_B >= max_new_B)))
        tokens_BxR = c.tokens_BxR.at[:, c.i].set(jnp.where(emit_B, token_B, -1))
        logprobs_BxR = c.logprobs_BxR.at[:, c.i].set(jnp.where(emit_B, token_logprobs(logits_BxV, token_B), 0.0))
        return _Carry(c.i + 1, pools, jnp.where(emit_B, token_B, c.last_B), c.pos_B + emit_B.astype(jnp.int32),
                      num_new_B, done_B, th, tokens_BxR, logprobs_BxR)

    init = _Carry(jnp.int32(0), pools, col(LAST), col(POS), col(NUM_NEW), ~active_B, rows_think,
                  jnp.full((b, steps), -1, jnp.int32), jnp.zeros((b, steps), jnp.float32))
    out = jax.lax.while_loop(cond, body, init)
    if flags.think:
        think = jax.tree.map(lambda a, r: a.at[slot_B].set(r), think, out.think)
    return out.pools, think, out.tokens_BxR, out.logprobs_BxR
