"""Tokens to text while they stream in: stop strings, half-decoded characters, `<think>` splitting.

Each choice's whole token list is re-decoded when tokens arrive (the CLI's approach: byte-level
BPE only finalises a character once all its bytes are there) and only text that can no longer
change is released: a trailing U+FFFD (an incomplete UTF-8 character) and a tail that could still
grow into a stop string are held back. `ReasoningSplitter` then routes released text to
`reasoning_content` or `content`, holding back what could still be a `<think>`/`</think>` marker,
so streamed deltas concatenate to exactly the non-streamed message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class TokenizerLike(Protocol):
    """What the server needs of `nemotron_jax.Tokenizer` (the CLI hands one in)."""

    eos_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]], thinking: bool | None = None) -> list[int]: ...


def _partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class Detokenizer:
    """The text of one choice's growing token list (stop tokens left out), up to the first stop string."""

    def __init__(self, tokenizer: TokenizerLike, skip_ids: Iterable[int], stop_strings: Sequence[str] = ()):
        self.tokenizer, self.skip, self.stops = tokenizer, frozenset(skip_ids), tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one appears)
        self.released = 0  # characters of `text` handed out
        self.stopped = False

    def push(self, ids: Iterable[int]) -> str:
        """Add tokens; the newly releasable text. Sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        self.ids += [t for t in ids if t not in self.skip]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.startswith(self.text[:self.released]):
            return ""  # earlier text re-decoded differently (not seen with byte-level BPE): wait
        self.text = text
        start = max(0, self.released - max((len(s) for s in self.stops), default=0))
        hits = [k for k in (text.find(s, start) for s in self.stops) if k >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self._release(len(self.text))
        ready = len(text.rstrip("\ufffd"))
        return self._release(ready - _partial_suffix(text[:ready], self.stops))

    def flush(self) -> str:
        """At the end of the choice: whatever was held back."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out, self.released = self.text[self.released:upto], upto
        return out


class ReasoningSplitter:
    """Routes a response's text into (reasoning, content) deltas: a response that opens with
    `<think>` (after whitespace) reasons until `</think>`; the markers and the whitespace around
    the reasoning are dropped. A response without the opening marker is all content."""

    def __init__(self) -> None:
        self.state = "start"  # start | reasoning | content
        self.buffer = ""  # text not routed yet
        self.has_reasoning = False
        self._strip = False  # drop leading whitespace (just after a marker)

    def push(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning = ""
        if self.state == "start":
            head = self.buffer.lstrip()
            if not head or (THINK_OPEN.startswith(head) and head != THINK_OPEN):
                return "", ""  # only whitespace so far, or the marker still arriving
            if not head.startswith(THINK_OPEN):
                self.state = "content"
            else:
                self.state, self.has_reasoning, self._strip = "reasoning", True, True
                self.buffer = head[len(THINK_OPEN):]
        if self.state == "reasoning":
            if self._strip:
                self.buffer = self.buffer.lstrip()
                self._strip = not self.buffer
            body, sep, rest = self.buffer.partition(THINK_CLOSE)
            if not sep:  # hold back a partial </think> and the whitespace that may precede it
                cut = len(body[:len(body) - _partial_suffix(body, [THINK_CLOSE])].rstrip())
                self.buffer = body[cut:]
                return body[:cut], ""
            reasoning = body.rstrip()
            self.state, self.buffer, self._strip = "content", rest, True
        if self._strip:
            self.buffer = self.buffer.lstrip()
            self._strip = not self.buffer
        content, self.buffer = self.buffer, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """At the end: held-back text (an unclosed thought keeps its text as reasoning)."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return rest.rstrip(), ""
        return "", rest


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None when the response has no `<think>` block, content) of a whole response."""
    splitter = ReasoningSplitter()
    r1, c1 = splitter.push(text)
    r2, c2 = splitter.flush()
    return (r1 + r2 if splitter.has_reasoning else None), c1 + c2
