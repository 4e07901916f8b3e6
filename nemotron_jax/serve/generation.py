"""One API request's generation: its choices as engine requests, and their text as it arrives.

Shared by both endpoints: the sampling defaults (SPEC §3: reasoning on samples at temperature 0.6,
top-p 0.95; off or unset is greedy), the context-length check done before the engine sees the
request, and `Generation`, which turns token events into per-choice `Update`s (released text,
the tokens behind it, a finish reason) and aborts what the client no longer waits for.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from typing import Any

from nemotron_jax.engine import SamplingOptions
from nemotron_jax.serve.protocol import APIError, Usage
from nemotron_jax.serve.runner import EngineFailure, EngineRequest, EngineRunner
from nemotron_jax.serve.text import Detokenizer, TokenizerLike

SEED_MODULUS = 2 ** 31  # the engine keeps seeds in int32


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What the server needs besides the engine and tokenizer. `on_defaults` / `off_defaults`:
    {"temperature", "top_p"} for requests that leave them unset, by the reasoning toggle."""

    model_name: str
    stop_ids: tuple[int, ...]
    on_defaults: Mapping[str, float]
    off_defaults: Mapping[str, float]
    max_model_len: int
    default_max_tokens: int = 2048
    pool_tokens: int | None = None  # tokens one request may hold in the page pool (create_app fills it)


@dataclasses.dataclass
class Update:
    """New output of one choice: text released since the last update and the tokens that came."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None = None


@dataclasses.dataclass
class _Choice:
    index: int
    request_id: Hashable
    detok: Detokenizer
    count: int = 0  # tokens generated (a final stop token included)
    finish_reason: str | None = None


def sampling_options(req: Any, thinking: bool | None, config: ServerConfig, max_tokens: int, index: int,
                     seed: int, max_thinking_tokens: int | None = None) -> SamplingOptions:
    defaults = config.on_defaults if thinking else config.off_defaults
    temperature = defaults["temperature"] if req.temperature is None else req.temperature
    top_p = defaults["top_p"] if req.top_p is None else req.top_p
    stops = () if req.ignore_eos else tuple(config.stop_ids)
    return SamplingOptions(max_tokens, float(temperature), float(top_p), int(req.top_k), seed, index, stops,
                           max_thinking_tokens)


def request_seed(seed: int | None) -> int:
    """The request's seed in the engine's range; a fresh random one when unset (as OpenAI samples)."""
    return secrets.randbelow(SEED_MODULUS) if seed is None else seed % SEED_MODULUS


def new_tokens(requested: int | None, prompt_len: int, config: ServerConfig, param: str = "max_tokens") -> int:
    """max_tokens for a prompt: the request's (400 when prompt + it exceed the context), or the
    default clipped to what is left of the context and of the page pool."""
    room = config.max_model_len - prompt_len
    if requested is None:
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {config.max_model_len} tokens; the "
                           f"prompt has {prompt_len}, leaving no room to generate", "messages",
                           "context_length_exceeded")
        pool_room = room if config.pool_tokens is None else config.pool_tokens - prompt_len
        return max(1, min(config.default_max_tokens, room, pool_room))
    if requested > room:
        raise APIError(400, f"This model's maximum context length is {config.max_model_len} tokens. However, you "
                       f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in "
                       f"the completion). Please reduce the prompt or {param}.", param, "context_length_exceeded")
    return requested


def sse(payload: Any) -> str:
    """One server-sent event (`data: {json}`) of a response model or a plain dict."""
    body = payload.model_dump(exclude_none=True) if hasattr(payload, "model_dump") else payload
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


class Generation:
    """The choices of one API request. `prompts[i]` with `options[i]` per choice; choices of one
    prompt share a `group` (prefilled once). Iterate `updates()` once."""

    def __init__(self, runner: EngineRunner, tokenizer: TokenizerLike, config: ServerConfig, prefix: str,
                 stop_strings: Sequence[str] = ()):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.stop_strings = tuple(stop_strings)
        self.choices: list[_Choice] = []
        self.requests: list[EngineRequest] = []
        self._events: Any = None  # the runner's queue, once started

    def add(self, prompt_ids: list[int], options: SamplingOptions, group: Hashable | None) -> None:
        index = len(self.choices)
        rid = (self.id, index)
        self.choices.append(_Choice(index, rid, Detokenizer(self.tokenizer, self.config.stop_ids, self.stop_strings)))
        self.requests.append(EngineRequest(rid, prompt_ids, options, group))

    async def start(self) -> None:
        """Queue every choice in the engine (400 with the engine's reason when it refuses one)."""
        try:
            self._events = await self.runner.submit(self.requests)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error") from None

    @property
    def completion_tokens(self) -> int:
        return sum(c.count for c in self.choices)

    async def updates(self) -> AsyncIterator[list[Update]]:
        """Updates, one list per engine step, until every choice has finished. Whatever is still
        running when this stops early (client gone, error) is aborted."""
        by_id = {c.request_id: c for c in self.choices}
        try:
            while any(c.finish_reason is None for c in self.choices):
                item = await self._events.get()
                if isinstance(item, EngineFailure):
                    raise APIError(500, str(item), type="server_error")
                yield self._absorb(item, by_id)
        finally:
            self.close()

    async def whole(self) -> list[Update]:
        """Every choice's whole output (for a response that is not streamed), one `Update` each."""
        out = [Update(c.index, "", [], []) for c in self.choices]
        async for updates in self.updates():
            for up in updates:
                whole = out[up.index]
                whole.text += up.text
                whole.tokens += up.tokens
                whole.logprobs += up.logprobs
                whole.finish_reason = up.finish_reason or whole.finish_reason
        return out

    def close(self) -> None:
        """Abort the choices still running (idempotent: the engine ignores finished ids)."""
        live = [c.request_id for c in self.choices if c.finish_reason is None]
        for c in self.choices:
            c.finish_reason = c.finish_reason or "abort"
        self.runner.abort(live)

    def _absorb(self, events: list[Any], by_id: dict[Hashable, _Choice]) -> list[Update]:
        grouped: dict[int, list[Any]] = {}
        for ev in events:
            grouped.setdefault(by_id[ev.request_id].index, []).append(ev)
        updates = []
        for index, evs in grouped.items():
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue  # ended on a stop string: the rest of that step's tokens are dropped
            toks = [e for e in evs if e.token is not None]
            choice.count += len(toks)
            text = choice.detok.push([e.token for e in toks])
            kept = [e for e in toks if e.token not in choice.detok.skip]
            if choice.detok.stopped:
                choice.finish_reason = "stop"
                self.runner.abort([choice.request_id])
            elif evs[-1].finished:
                choice.finish_reason = evs[-1].finish_reason or "stop"
                text += choice.detok.flush()
            updates.append(Update(index, text, [e.token for e in kept], [e.logprob for e in kept],
                                  choice.finish_reason))
        return updates

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)
