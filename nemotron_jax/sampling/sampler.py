"""Batched generation: one jitted prefill, then a decode loop that is one `jax.lax.while_loop`.

Prompts of different lengths are right-padded to a common length and prefilled together at
positions `0..T-1`; each row's first new token comes from the logits at its own last prompt
position and its next position is its own length. Padding writes garbage into cache slots past a
row's length, but masking is by position and each such slot is overwritten by that row's own new
token before any query may see it. The decode loop then feeds one token per row per iteration,
stops a row at a stop token or after `max_new_tokens`, and leaves the loop when every row is done,
all without returning to Python.

The functions are pure in the weights (`graphdef, state`), so an RL trainer can sample with its
current parameters. Shapes are bucketed (batch, prompt length and cache length each rounded up to
a power of two) so repeated calls compile once per bucket; all sampling knobs are traced values.

Legend: B batch rows, T prompt tokens, S cache slots (= output buffer length), V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from nemotron_jax.model.attention import KVCache
from nemotron_jax.sampling import think as think_lib
from nemotron_jax.sampling.cache import MIN_BATCH, MIN_CACHE, MIN_PROMPT, check_cache_dtype, pow2_bucket
from nemotron_jax.sampling.logits_processing import SamplingParams, make_params, sample, token_logprobs
from nemotron_jax.sharding import Layout, constrain, use_layout

# Trace counts per jitted function: a test (or a user) can check that calls did not recompile.
TRACES: collections.Counter[str] = collections.Counter()
# A cache entry's axes: [B, S, K, H], or [L, B, S, K, H] for a scanned run's stacked layers.
_CACHE_AXES = (None, "batch", None, "act_kv_heads", None)


class Flags(NamedTuple):
    """Static choices of code path (part of the compile key)."""

    greedy: bool
    truncate: bool
    think: bool


class Knobs(NamedTuple):
    """Traced per-call values: changing them never recompiles."""

    params: SamplingParams
    max_new: jax.Array  # i32 scalar
    stop_ids_K: jax.Array  # i32, padded with -1
    think_budget: jax.Array  # i32 scalar
    think: think_lib.ThinkArrays | None


class DecodeState(NamedTuple):
    """The while-loop carry. `last_B` is the newest token, not yet fed; it goes to `position_B`."""

    cache: list
    last_B: jax.Array
    position_B: jax.Array
    tokens_BxS: jax.Array
    logprobs_BxS: jax.Array
    num_new_B: jax.Array
    done_B: jax.Array
    key: jax.Array
    think: think_lib.ThinkState | None


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]
    logprobs: list[list[float]] | None


# ---------------------------------------------------------------------------------- jitted core
def _emit(st: DecodeState, logits_BxV: jax.Array, knobs: Knobs, flags: Flags) -> DecodeState:
    """Choose each active row's next token from its logits and do the bookkeeping."""
    batch = logits_BxV.shape[0]
    rows_B = jnp.arange(batch)
    keys_B = jax.vmap(lambda r, n: jax.random.fold_in(jax.random.fold_in(st.key, r), n))(rows_B, st.num_new_B)
    token_B = sample(logits_BxV, keys_B, knobs.params, greedy=flags.greedy, truncate=flags.truncate)
    think_state = st.think
    if flags.think:
        token_B = think_lib.choose(st.think, token_B, knobs.think)
    active_B = ~st.done_B
    slot_B = jnp.where(active_B, st.num_new_B, st.tokens_BxS.shape[1])  # out of range: dropped
    tokens_BxS = st.tokens_BxS.at[rows_B, slot_B].set(token_B, mode="drop")
    logprobs_BxS = st.logprobs_BxS.at[rows_B, slot_B].set(token_logprobs(logits_BxV, token_B), mode="drop")
    num_new_B = st.num_new_B + active_B.astype(jnp.int32)
    is_stop_B = (token_B[:, None] == knobs.stop_ids_K[None, :]).any(-1)
    done_B = st.done_B | (active_B & (is_stop_B | (num_new_B >= knobs.max_new)))
    if flags.think:
        advanced = think_lib.advance(st.think, token_B, knobs.think_budget, knobs.think)
        think_state = jax.tree.map(lambda new, old: jnp.where(active_B.reshape((-1,) + (1,) * (new.ndim - 1)),
                                                              new, old), advanced, st.think)
    return st._replace(last_B=jnp.where(active_B, token_B, st.last_B), tokens_BxS=tokens_BxS,
                       logprobs_BxS=logprobs_BxS, num_new_B=num_new_B, done_B=done_B, think=think_state)


@partial(jax.jit, static_argnames=("graphdef", "cache_len", "cache_dtype", "flags", "layout"))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxT: jax.Array, lengths_B: jax.Array,
            done_B: jax.Array, window_BxW: jax.Array | None, key: jax.Array, knobs: Knobs, *,
            cache_len: int, cache_dtype: str, flags: Flags, layout: Layout | None = None) -> DecodeState:
    """Run the padded prompts through the model into a fresh cache and emit each row's first token.
    `layout` is static so that a program traced under one sharding layout is never reused under another."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    batch, t = tokens_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    with use_layout(layout):
        cache = [None if c is None else KVCache(*(constrain(a, _CACHE_AXES[-a.ndim:]) for a in c))
                 for c in model.init_cache(batch, cache_len, cache_dtype)]
        h_BxTxD, cache = model.hidden_states(tokens_BxT, positions_BxT, None, cache)
        h_Bx1xD = h_BxTxD[jnp.arange(batch), lengths_B - 1][:, None]
        logits_BxV = model.project(h_Bx1xD)[:, 0]
    zeros_B = jnp.zeros((batch,), jnp.int32)
    st = DecodeState(
        cache=cache, last_B=zeros_B, position_B=lengths_B.astype(jnp.int32),
        tokens_BxS=jnp.zeros((batch, cache_len), jnp.int32),
        logprobs_BxS=jnp.zeros((batch, cache_len), jnp.float32), num_new_B=zeros_B, done_B=done_B, key=key,
        think=think_lib.init_state(window_BxW, knobs.think) if flags.think else None)
    return _emit(st, logits_BxV, knobs, flags)


@partial(jax.jit, static_argnames=("graphdef", "flags", "layout"), donate_argnames=("st",))
def decode(graphdef: nnx.GraphDef, state: nnx.State, st: DecodeState, knobs: Knobs, steps: jax.Array, *,
           flags: Flags, layout: Layout | None = None) -> DecodeState:
    """Up to `steps` decode iterations in one `lax.while_loop`; returns early once every row is done.
    `st` is donated: its buffers (the cache above all) are updated in place."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)

    def cond(carry: tuple[jax.Array, DecodeState]) -> jax.Array:
        i, s = carry
        return (i < steps) & ~jnp.all(s.done_B)

    def body(carry: tuple[jax.Array, DecodeState]) -> tuple[jax.Array, DecodeState]:
        i, s = carry
        with use_layout(layout):
            logits_Bx1xV, cache = model(s.last_B[:, None], s.position_B[:, None], None, s.cache)
        s = s._replace(cache=cache, position_B=jnp.where(s.done_B, s.position_B, s.position_B + 1))
        return i + 1, _emit(s, logits_Bx1xV[:, 0], knobs, flags)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), st))[1]


# ---------------------------------------------------------------------------------- the Python side
@dataclasses.dataclass
class _Request:
    """Validated, padded inputs of one generate call."""

    prompts: list[list[int]]
    tokens_BxT: np.ndarray
    lengths_B: np.ndarray
    done_B: np.ndarray
    cache_len: int
    max_new: int


def validate_request(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab: int, max_positions: int,
                     cache_len: int | None = None) -> _Request:
    """Check prompts and lengths (ValueError with the reason) and pad them into shape buckets."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise ValueError(f"prompt {i} must be a non-empty list of integer token ids")
        if arr.min() < 0 or arr.max() >= vocab:
            raise ValueError(f"prompt {i}: token ids must lie in [0, {vocab}), got [{arr.min()}, {arr.max()}]")
        rows.append([int(t) for t in arr])
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    longest = max(len(p) for p in rows)
    need = longest + int(max_new_tokens)
    if need > max_positions:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the "
                         f"model's max_position_embeddings ({max_positions})")
    if cache_len is not None and need > cache_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds "
                         f"cache_len ({cache_len})")
    cache = cache_len if cache_len is not None else pow2_bucket(need, MIN_CACHE, cap=max_positions)
    t = min(pow2_bucket(longest, MIN_PROMPT), cache)  # prefill writes slots 0..t-1
    batch = pow2_bucket(len(rows), MIN_BATCH)
    tokens = np.zeros((batch, t), np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, p in enumerate(rows):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
    done = np.arange(batch) >= len(rows)  # batch-padding rows start finished
    return _Request(rows, tokens, lengths, done, cache, int(max_new_tokens))


def _stop_array(stop_tokens: Sequence[int], vocab: int) -> jax.Array:
    stops = sorted({int(t) for t in stop_tokens})
    if stops and (stops[0] < 0 or stops[-1] >= vocab):
        raise ValueError(f"stop tokens must lie in [0, {vocab}), got {stops}")
    out = np.full((pow2_bucket(len(stops), 4),), -1, np.int32)
    out[:len(stops)] = stops
    return jnp.asarray(out)


def stream(graphdef: nnx.GraphDef, state: nnx.State, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           stop_tokens: Sequence[int] | None = None, max_thinking_tokens: int | None = None,
           think_tokens: think_lib.ThinkTokens | tuple[Sequence[int], Sequence[int]] | None = None,
           cache_dtype: str = "float32", cache_len: int | None = None, chunk: int | None = None,
           layout: Layout | None = None) -> Iterator[DecodeState]:
    """Validate everything (ValueError before any work), then return an iterator that yields the
    decode state after prefill and after every `chunk` decode iterations (all at once
    when `chunk` is None) until every row is done. Each yield is one jitted call, never one token.
    Read what you need from a yielded state before advancing: the next step donates its buffers.

    `stop_tokens` None means the config's eos ids; [] never stops early. `max_thinking_tokens`
    with `think_tokens` (a `ThinkTokens` or an (open_ids, close_ids) pair) bounds the reasoning
    (see `sampling.think`). `cache_len` fixes the cache length (default: a power-of-two bucket).
    """
    module = nnx.merge(graphdef, state)
    cfg = module.config
    req = validate_request(prompts, max_new_tokens, cfg.vocab_size, cfg.max_position_embeddings, cache_len)
    check_cache_dtype(cache_dtype)
    params, greedy, truncate = make_params(float(temperature), int(top_k), float(top_p))
    stops = _stop_array(cfg.eos_token_ids if stop_tokens is None else stop_tokens, cfg.vocab_size)
    think, window, budget = None, None, 0
    if max_thinking_tokens is not None:
        if think_tokens is None:
            raise ValueError("max_thinking_tokens needs think_tokens (e.g. Tokenizer.think_tokens)")
        if max_thinking_tokens < 0:
            raise ValueError(f"max_thinking_tokens must be >= 0, got {max_thinking_tokens}")
        spec = think_lib.ThinkTokens.coerce(think_tokens)
        think, budget = spec.arrays(), int(max_thinking_tokens)
        window = jnp.asarray(think_lib.prompt_window(req.prompts, len(req.lengths_B), spec.window))
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    flags = Flags(greedy, truncate, think is not None)
    knobs = Knobs(params, jnp.int32(req.max_new), stops, jnp.int32(budget), think)
    return _run(graphdef, state, req, knobs, flags, window, int(seed), cache_dtype, chunk, layout)


def _run(graphdef: nnx.GraphDef, state: nnx.State, req: _Request, knobs: Knobs, flags: Flags,
         window: jax.Array | None, seed: int, cache_dtype: str, chunk: int | None,
         layout: Layout | None) -> Iterator[DecodeState]:
    if req.max_new == 0:
        return
    key = jax.random.key(seed)
    st = prefill(graphdef, state, jnp.asarray(req.tokens_BxT), jnp.asarray(req.lengths_B),
                 jnp.asarray(req.done_B), window, key, knobs, cache_len=req.cache_len,
                 cache_dtype=cache_dtype, flags=flags, layout=layout)
    yield st
    steps = jnp.int32(req.max_new if chunk is None else chunk)
    while not bool(jnp.all(st.done_B)):
        st = decode(graphdef, state, st, knobs, steps, flags=flags, layout=layout)
        yield st


def collect(st: DecodeState, num_rows: int, with_logprobs: bool) -> GenerationResult:
    """The new tokens (and their raw log-probs) of the first `num_rows` rows, as Python lists."""
    num_new = on_host(st.num_new_B)[:num_rows]
    tokens = on_host(st.tokens_BxS)[:num_rows]
    out = [tokens[i, :n].tolist() for i, n in enumerate(num_new)]
    logprobs = None
    if with_logprobs:
        lp = on_host(st.logprobs_BxS)[:num_rows]
        logprobs = [lp[i, :n].tolist() for i, n in enumerate(num_new)]
    return GenerationResult(out, logprobs)


def on_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host; in a multi-host run, rows held by other hosts are gathered."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate(graphdef: nnx.GraphDef, state: nnx.State, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, return_logprobs: bool = False, **options: Any) -> GenerationResult:
    """New tokens for each prompt (see `stream` for the options); each row ends with the stop token
    that ended it, if one did. With `return_logprobs`, also their log-probs under the raw model."""
    states = collections.deque(stream(graphdef, state, prompts, max_new_tokens, **options), maxlen=1)
    if not states:  # max_new_tokens == 0
        return GenerationResult([[] for _ in prompts], [[] for _ in prompts] if return_logprobs else None)
    return collect(states[0], len(prompts), return_logprobs)
