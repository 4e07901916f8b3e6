"""The reasoning budget: a per-row state machine run inside the decode loop.

A reasoning-on response reads `<think>…</think>answer`. With `max_thinking_tokens` set, each row
tracks where it is (before the open marker, inside the think block, after it) by matching the
last emitted tokens against the two markers. Once a row has emitted that many tokens inside the
block without closing it, the next tokens are *forced* to the close marker, one per step, after
which sampling continues normally. Forced tokens are ordinary emitted tokens (they are returned,
cached and fed back like any other).

Markers are token-id patterns because byte-level BPE spells one string several ways: with the
Llama-3 tokenizer `</think>` is `["</", "think", ">"]` but `"</think>\n\n"` ends in the single
token `">\n\n"`. A pattern therefore lists, per position, every id accepted there when
*detecting*; the first id of each position is the canonical spelling, and the canonical close
sequence is what gets forced. `Tokenizer.think_tokens` builds these patterns.

Legend: B batch rows, W window (longest marker), L marker length, M alternatives per position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Pattern = tuple[tuple[int, ...], ...]
BEFORE, INSIDE, AFTER = 0, 1, 2
_WINDOW_PAD, _PATTERN_PAD = -1, -2  # never equal, and never a token id


@dataclasses.dataclass(frozen=True)
class ThinkTokens:
    """Token-id patterns of the think markers: `open[i]` = ids accepted at position i (first = canonical)."""

    open: Pattern
    close: Pattern

    def __post_init__(self) -> None:
        for name in ("open", "close"):
            pattern = tuple(tuple(int(t) for t in ids) for ids in getattr(self, name))
            if not pattern or any(not ids or min(ids) < 0 for ids in pattern):
                raise ValueError(f"think marker {name!r} must be a non-empty sequence of non-empty id sets, "
                                 f"got {getattr(self, name)!r}")
            object.__setattr__(self, name, pattern)

    @classmethod
    def exact(cls, open_ids: Sequence[int], close_ids: Sequence[int]) -> ThinkTokens:
        """Markers matched exactly as given (no alternative spellings)."""
        return cls(tuple((int(t),) for t in open_ids), tuple((int(t),) for t in close_ids))

    @classmethod
    def coerce(cls, value: ThinkTokens | tuple[Sequence[int], Sequence[int]]) -> ThinkTokens:
        if isinstance(value, ThinkTokens):
            return value
        try:
            open_ids, close_ids = value
        except (TypeError, ValueError):
            raise ValueError("think_tokens must be a ThinkTokens or a pair (open_ids, close_ids)") from None
        return cls.exact(open_ids, close_ids)

    @property
    def close_ids(self) -> tuple[int, ...]:
        """The canonical close sequence: the tokens that are forced."""
        return tuple(ids[0] for ids in self.close)

    @property
    def window(self) -> int:
        return max(len(self.open), len(self.close))

    def arrays(self) -> ThinkArrays:
        return ThinkArrays(_pattern_array(self.open), _pattern_array(self.close),
                           jnp.asarray(self.close_ids, jnp.int32))


class ThinkArrays(NamedTuple):
    open_LxM: jax.Array
    close_LxM: jax.Array
    close_ids_L: jax.Array


class ThinkState(NamedTuple):
    phase_B: jax.Array  # BEFORE / INSIDE / AFTER
    count_B: jax.Array  # tokens emitted inside the think block so far
    force_B: jax.Array  # index into the close sequence being forced, -1 when not forcing
    window_BxW: jax.Array  # the last W tokens of prompt + response


def _pattern_array(pattern: Pattern) -> jax.Array:
    width = max(len(ids) for ids in pattern)
    out = np.full((len(pattern), width), _PATTERN_PAD, np.int32)
    for i, ids in enumerate(pattern):
        out[i, :len(ids)] = ids
    return jnp.asarray(out)


def prompt_window(prompts: Sequence[Sequence[int]], batch: int, width: int) -> np.ndarray:
    """The last `width` prompt tokens per row (left-padded), so markers spanning the prompt end match."""
    out = np.full((batch, width), _WINDOW_PAD, np.int32)
    for i, p in enumerate(prompts):
        tail = list(p)[-width:]
        out[i, width - len(tail):] = tail
    return out


def _matches(window_BxW: jax.Array, pattern_LxM: jax.Array) -> jax.Array:
    tail_BxL = window_BxW[:, window_BxW.shape[1] - pattern_LxM.shape[0]:]
    return (tail_BxL[:, :, None] == pattern_LxM[None]).any(-1).all(-1)


def init_state(window_BxW: jax.Array, arrays: ThinkArrays) -> ThinkState:
    """Rows whose prompt already ends with the open marker start inside the think block."""
    batch = window_BxW.shape[0]
    phase_B = jnp.where(_matches(window_BxW, arrays.open_LxM), INSIDE, BEFORE).astype(jnp.int32)
    zeros_B = jnp.zeros((batch,), jnp.int32)
    return ThinkState(phase_B, zeros_B, zeros_B - 1, window_BxW)


def choose(state: ThinkState, sampled_B: jax.Array, arrays: ThinkArrays) -> jax.Array:
    """The sampled token, or the next close-marker token for rows being forced."""
    idx_B = jnp.clip(state.force_B, 0, arrays.close_ids_L.shape[0] - 1)
    return jnp.where(state.force_B >= 0, arrays.close_ids_L[idx_B], sampled_B)


def advance(state: ThinkState, token_B: jax.Array, budget: jax.Array, arrays: ThinkArrays) -> ThinkState:
    """Account for one emitted token per row and decide whether the next one is forced."""
    window_BxW = jnp.concatenate([state.window_BxW[:, 1:], token_B[:, None]], axis=1)
    opened_B = (state.phase_B == BEFORE) & _matches(window_BxW, arrays.open_LxM)
    was_forcing_B = state.force_B >= 0
    force_B = jnp.where(was_forcing_B, state.force_B + 1, -1)
    finished_forcing_B = was_forcing_B & (force_B >= arrays.close_ids_L.shape[0])
    closed_B = (state.phase_B == INSIDE) & (_matches(window_BxW, arrays.close_LxM) | finished_forcing_B)
    force_B = jnp.where(finished_forcing_B, -1, force_B)
    phase_B = jnp.where(opened_B, INSIDE, jnp.where(closed_B, AFTER, state.phase_B))
    count_B = state.count_B + ((state.phase_B == INSIDE) & ~closed_B).astype(jnp.int32)
    start_B = (phase_B == INSIDE) & (force_B < 0) & ~was_forcing_B & (count_B >= budget)
    force_B = jnp.where(start_B, 0, force_B)
    return ThinkState(phase_B.astype(jnp.int32), count_B, force_B.astype(jnp.int32), window_BxW)
