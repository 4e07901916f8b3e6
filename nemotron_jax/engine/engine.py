"""`Engine`: continuous batching over the paged cache, behind a request-level interface.

Each `step()` is at most one prefill call (chunks of waiting prompts) and one decode call (up to
`decode_steps` tokens for every running request), then one device-to-host transfer of the new
tokens and log-probs; the host turns them into `TokenEvent`s and frees the pages of requests that
ended. `generate` is `add_request` for every sample plus `step()` until no work is left.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.engine import step as step_lib
from nemotron_jax.engine.pages import Geometry, PageAllocator, default_num_pages, init_pools
from nemotron_jax.engine.scheduler import DONE, Request, Scheduler
from nemotron_jax.model.transformer import Transformer
from nemotron_jax.sampling import think as think_lib
from nemotron_jax.sampling.cache import check_cache_dtype, pow2_bucket
from nemotron_jax.sampling.logits_processing import make_params
from nemotron_jax.sampling.sampler import on_host
from nemotron_jax.sharding import Layout

NO_BUDGET = 2 ** 30


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Per-request knobs. `stop_tokens` None: the config's eos ids; (): never stop early.
    `seed` and `sample_index` make the request's key; `max_thinking_tokens` needs the engine's
    `think_tokens`."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    sample_index: int = 0
    stop_tokens: tuple[int, ...] | None = None
    max_thinking_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One emitted token (`token` None only for a request that ends without one: max_new_tokens 0)."""

    request_id: Hashable
    token: int | None
    logprob: float | None
    finished: bool
    finish_reason: str | None  # "stop" (a stop token, included in the output) | "length" | None


class Engine:
    """Continuous-batching generation for a `nemotron_jax.Model` (see the package docstring)."""

    def __init__(self, model: Any, max_batch: int = 32, page_size: int = 16, num_pages: int | None = None, *,
                 cache_dtype: str | None = None, prefill_tokens: int = 256, prefill_rows: int = 8,
                 decode_steps: int = 4, attention_impl: str = "xla", share_prefixes: bool = True,
                 think_tokens: think_lib.ThinkTokens | tuple[Sequence[int], Sequence[int]] | None = None,
                 layout: Layout | None = None):
        """`model`: a `nemotron_jax.Model`, or a bare `Transformer` module with its `layout` (how a
        trainer hands over its policy; `set_weights` then swaps in each update's parameters)."""
        if max_batch < 1 or page_size < 1 or decode_steps < 1 or prefill_tokens < 1 or prefill_rows < 1:
            raise ValueError("max_batch, page_size, decode_steps, prefill_tokens and prefill_rows must be >= 1")
        module = model if isinstance(model, Transformer) else model.module
        self.layout = layout if isinstance(model, Transformer) else model.layout
        self.graphdef, self.state = nnx.split(module)
        self.config = module.config
        self.geometry = Geometry.of(module)
        self.cache_dtype = check_cache_dtype(cache_dtype or module.policy.dtype.name)
        self.page_size, self.max_batch, self.decode_steps = page_size, max_batch, decode_steps
        self.impl = attention_impl if self.layout is None else "xla"  # kernels see whole arrays
        self.max_pages_per_seq = -(-self.config.max_position_embeddings // page_size)
        if num_pages is None:
            num_pages = default_num_pages(self.geometry, page_size, self.cache_dtype, max_batch,
                                          self.config.max_position_embeddings)
        self.num_pages = num_pages
        self.pools = init_pools(self.geometry, num_pages, page_size, self.cache_dtype, self.layout)
        self.scheduler = Scheduler(PageAllocator(num_pages, page_size, share_prefixes), max_batch, prefill_tokens,
                                   prefill_rows)
        self.think_tokens = None if think_tokens is None else think_lib.ThinkTokens.coerce(think_tokens)
        self._think = None
        self._pending: list[TokenEvent] = []
        self._ids = itertools.count()
        self.stats = {"prefill_tokens": 0, "prefill_calls": 0, "decode_calls": 0, "preemptions": 0}

    # ------------------------------------------------------------------ request interface
    def add_request(self, prompt_ids: Sequence[int], options: SamplingOptions = SamplingOptions(),
                    request_id: Hashable | None = None, *, group: Hashable | None = None) -> Hashable:
        """Queue one request (ValueError with the reason if it is invalid or can never fit); its id.
        Requests of one `group` share a prompt: it is prefilled once and its full pages shared."""
        cfg = self.config
        prompt = [int(t) for t in np.asarray(prompt_ids).reshape(-1)] if len(prompt_ids) else []
        if not prompt or min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise ValueError(f"prompt must be a non-empty list of token ids in [0, {cfg.vocab_size})")
        n = options.max_new_tokens
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {n!r}")
        if len(prompt) + n > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({n}) exceeds the model's "
                             f"max_position_embeddings ({cfg.max_position_embeddings})")
        make_params(float(options.temperature), int(options.top_k), float(options.top_p))  # validates
        stops = tuple(sorted({int(t) for t in (cfg.eos_token_ids if options.stop_tokens is None
                                                 else options.stop_tokens)}))
        if stops and (stops[0] < 0 or stops[-1] >= cfg.vocab_size):
            raise ValueError(f"stop tokens must lie in [0, {cfg.vocab_size}), got {list(stops)}")
        budget = options.max_thinking_tokens
        if budget is not None and (self.think_tokens is None or budget < 0):
            raise ValueError("max_thinking_tokens needs Engine(think_tokens=...) and must be >= 0")
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.scheduler.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        top_k = 1 if options.temperature == 0 else int(options.top_k)
        req = Request(rid, prompt, int(n), float(options.temperature), float(options.top_p), top_k,
                      int(options.seed), int(options.sample_index), stops, budget, group,
                      self.scheduler.next_order())
        if n == 0:
            self._pending.append(TokenEvent(rid, None, None, True, "length"))
            return rid
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: Hashable) -> None:
        """Drop a request and free its pages (no-op for an unknown or finished id)."""
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            self.scheduler.release(req)

    def set_weights(self, state: nnx.State) -> None:
        """Generate with other parameters of the same model (an RL policy after an update); the
        compiled programs and the pools are kept. Call between steps, not while requests run."""
        if jax.tree.structure(state) != jax.tree.structure(self.state):
            raise ValueError("set_weights needs parameters of the same model (same tree of arrays)")
        self.state = state

    def has_work(self) -> bool:
        return bool(self.scheduler.requests) or bool(self._pending)

    def step(self) -> list[TokenEvent]:
        """One prefill call and one decode call; the tokens they emitted."""
        events, self._pending = self._pending, []
        chunks = self.scheduler.plan_prefill()
        if chunks:
            self._prefill(chunks)
            self.scheduler.commit_prefill(chunks)
        batch = self.scheduler.plan_decode(self.decode_steps)
        if batch:
            events += self._decode(batch)
        self.stats["preemptions"] = sum(r.preemptions for r in self.scheduler.requests.values())
        return events

    def stream(self, prompt_ids: Sequence[int], options: SamplingOptions = SamplingOptions(),
               ) -> Iterator[list[TokenEvent]]:
        """One request's tokens as they come: after each engine step, the events it emitted (for a
        single caller such as the CLI; a server drives `step()` itself for all its clients). Closing
        the iterator early aborts the request."""
        rid = self.add_request(prompt_ids, options)
        finished = False
        try:
            while not finished:
                mine = [e for e in self.step() if e.request_id == rid]
                finished = any(e.finished for e in mine)
                if mine:
                    yield mine
        finally:
            if not finished:
                self.abort(rid)

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop_tokens: Sequence[int] | None = None, n: int = 1, return_logprobs: bool = False,
                 max_thinking_tokens: int | None = None) -> Any:
        """New tokens for each prompt, `n` samples each (consecutive: n * len(prompts) lists, each
        ending with the stop token that ended it, if one did). With `return_logprobs`:
        (tokens, raw log-probs of those tokens)."""
        lengths = self.request_lengths(prompts, max_new_tokens, n)
        stops = None if stop_tokens is None else tuple(stop_tokens)
        ids, added = [], []
        try:
            for i, (prompt, m) in enumerate(zip(prompts, lengths, strict=True)):
                for j in range(n):
                    opts = SamplingOptions(int(m), temperature, top_p, top_k, seed, i * n + j, stops,
                                           max_thinking_tokens)
                    rid = ("generate", next(self._ids))
                    group = ("group", rid[1] - j) if n > 1 and self.scheduler.pages.sharing else None
                    added.append(self.add_request(prompt, opts, rid, group=group))
                    ids.append(rid)
        except ValueError:
            for rid in added:
                self.abort(rid)
            self._pending = [e for e in self._pending if e.request_id not in set(added)]
            raise
        wanted = set(ids)
        tokens: dict[Hashable, list[int]] = {rid: [] for rid in ids}
        logprobs: dict[Hashable, list[float]] = {rid: [] for rid in ids}
        while any(rid in self.scheduler.requests for rid in wanted) or any(
                e.request_id in wanted for e in self._pending):
            for e in self.step():
                if e.request_id in wanted and e.token is not None:
                    tokens[e.request_id].append(e.token)
                    logprobs[e.request_id].append(e.logprob)
        out = [tokens[rid] for rid in ids]
        return (out, [logprobs[rid] for rid in ids]) if return_logprobs else out

    @staticmethod
    def request_lengths(prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], n: int = 1,
                        ) -> list[int]:
        """`generate`'s argument checks: max_new_tokens per prompt (ValueError on bad shapes)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        lengths = [max_new_tokens] * len(prompts) if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
        if len(lengths) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(lengths)} entries for {len(prompts)} prompts")
        for m in lengths:
            if not isinstance(m, (int, np.integer)) or m < 0:
                raise ValueError(f"max_new_tokens must be non-negative integers, got {m!r}")
        return [int(m) for m in lengths]

    @property
    def free_pages(self) -> int:
        return self.scheduler.pages.num_free

    # ------------------------------------------------------------------ device calls
    def _table(self, reqs: Sequence[Request], rows: int) -> np.ndarray:
        m = min(pow2_bucket(max(len(r.pages) for r in reqs), 1), self.max_pages_per_seq)
        table = np.zeros((rows, max(m, max(len(r.pages) for r in reqs))), np.int32)
        for i, r in enumerate(reqs):
            table[i, :len(r.pages)] = r.pages
        return table

    def _prefill(self, chunks: list[tuple[Request, int, int]]) -> None:
        rows = pow2_bucket(len(chunks), 1)
        width = pow2_bucket(max(stop - start for _, start, stop in chunks), 16)
        tokens = np.zeros((rows, width), np.int32)
        positions = np.zeros((rows, width), np.int32)
        valid = np.zeros((rows, width), bool)
        for i, (req, start, stop) in enumerate(chunks):
            known = req.known
            tokens[i, :stop - start] = known[start:stop]
            positions[i, :stop - start] = np.arange(start, stop)
            valid[i, :stop - start] = True
        table = self._table([r for r, _, _ in chunks], rows)
        self.pools = step_lib.prefill(self.graphdef, self.state, self.pools, jnp.asarray(tokens),
                                      jnp.asarray(positions), jnp.asarray(valid), jnp.asarray(table),
                                      geometry=self.geometry, impl=self.impl, layout=self.layout)
        self.stats["prefill_tokens"] += int(valid.sum())
        self.stats["prefill_calls"] += 1

    def _decode(self, batch: list[tuple[Request, int]]) -> list[TokenEvent]:
        reqs = [r for r, _ in batch]
        rows = min(pow2_bucket(len(reqs), 1), max(self.max_batch, len(reqs)))
        ints = np.zeros((rows, step_lib.NUM_INTS), np.int32)
        ints[:, step_lib.SLOT] = self.max_batch  # padding rows use the spare think row
        floats = np.zeros((rows, 2), np.float32)
        floats[:, step_lib.TOP_P] = 1.0
        num_stops = pow2_bucket(max(len(r.stop_ids) for r in reqs), 4)
        stops = np.full((rows, num_stops), -1, np.int32)
        think = any(r.think_budget is not None for r in reqs)
        window = None
        if think:
            width = self.think_tokens.window
            window = think_lib.prompt_window([r.prompt for r in reqs] + [[]] * (rows - len(reqs)), rows, width)
        for i, (r, _) in enumerate(batch):
            ints[i] = 0
            ints[i, [step_lib.LAST, step_lib.POS, step_lib.NUM_NEW, step_lib.MAX_NEW, step_lib.ACTIVE]] = (
                r.known[-1], r.target, len(r.tokens), r.max_new, 1)
            ints[i, [step_lib.SEED, step_lib.STREAM, step_lib.TOP_K, step_lib.SLOT]] = (
                r.seed, r.sample_index, r.top_k, r.slot)
            ints[i, step_lib.BUDGET] = NO_BUDGET if r.think_budget is None else r.think_budget
            ints[i, step_lib.FRESH] = int(r.fresh)
            floats[i] = (r.temperature, r.top_p)
            stops[i, :len(r.stop_ids)] = r.stop_ids
        sampling = any(r.temperature > 0 for r in reqs)
        flags = step_lib.Flags(sampling, sampling and any(r.temperature > 0 and (r.top_k > 0 or r.top_p < 1)
                                                          for r in reqs), think)
        think_state, arrays = None, None
        if think:
            arrays = self.think_tokens.arrays()
            think_state = self._think_state()
        self.pools, new_think, tok, lp = step_lib.decode(
            self.graphdef, self.state, self.pools, think_state, jnp.asarray(ints), jnp.asarray(floats),
            jnp.asarray(stops), jnp.asarray(self._table(reqs, rows)),
            None if window is None else jnp.asarray(window), arrays, geometry=self.geometry,
            steps=self.decode_steps, flags=flags, impl=self.impl, layout=self.layout)
        if think:
            self._think = new_think
        tokens, logprobs = on_host(tok), on_host(lp)
        self.stats["decode_calls"] += 1
        return self._absorb(reqs, tokens, logprobs)

    def _think_state(self) -> think_lib.ThinkState:
        if self._think is None:
            rows = self.max_batch + 1
            width = self.think_tokens.window
            self._think = jax.jit(lambda: think_lib.ThinkState(  # jit-made, like the step's outputs
                jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32), jnp.full((rows,), -1, jnp.int32),
                jnp.full((rows, width), -1, jnp.int32)))()
        return self._think

    def _absorb(self, reqs: list[Request], tokens: np.ndarray, logprobs: np.ndarray) -> list[TokenEvent]:
        events = []
        for i, r in enumerate(reqs):
            if r.think_budget is not None:
                r.fresh = False
            for tok, lp in zip(tokens[i].tolist(), logprobs[i].tolist(), strict=True):
                if tok < 0:
                    break
                r.tokens.append(tok)
                r.logprobs.append(lp)
                reason = "stop" if tok in r.stop_ids else "length" if len(r.tokens) >= r.max_new else None
                events.append(TokenEvent(r.id, tok, lp, reason is not None, reason))
                if reason is not None:
                    break
            r.computed = r.target
            if events and events[-1].request_id == r.id and events[-1].finished:
                self.scheduler.release(r)
                r.state = DONE
        return events


class EngineCache:
    """The engine for one `generate`-shaped call of a model (its `Model.generate`, an RL sampler):
    sized for the call (every row at full length, pages in a power-of-two bucket) and kept while the
    model's structure and the call's bucket stay the same, so repeated calls reuse its pools; the
    compiled programs are shared by every engine of the same shapes anyway."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._engine: Engine | None = None

    def get(self, module: Transformer, layout: Layout | None, state: nnx.State,
            prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], n: int = 1, *,
            max_batch: int | None = None, page_size: int = 16, num_pages: int | None = None,
            **engine_options: Any) -> Engine:
        lengths = Engine.request_lengths(prompts, max_new_tokens, n)
        if num_pages is None:
            need = n * sum(-(-(len(p) + m) // page_size) for p, m in zip(prompts, lengths, strict=True)) + 1
            num_pages = pow2_bucket(need, 16)
        max_batch = max_batch or min(pow2_bucket(n * len(prompts), 1), 256)
        if engine_options.get("think_tokens") is not None:  # hashable, for the key
            engine_options["think_tokens"] = think_lib.ThinkTokens.coerce(engine_options["think_tokens"])
        graphdef = nnx.graphdef(module)
        key = (graphdef, layout, max_batch, page_size, num_pages, tuple(sorted(engine_options.items())))
        if self._engine is None or key != self._key:
            self._engine = None  # free the old pools before making the new ones
            self._engine = Engine(module, max_batch, page_size, num_pages, layout=layout, **engine_options)
            self._key = key
        self._engine.set_weights(state)
        return self._engine
