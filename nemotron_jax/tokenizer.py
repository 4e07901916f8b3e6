"""`Tokenizer`: a Hugging Face `tokenizers` BPE plus the Llama-Nemotron chat template (SPEC §3).

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system|trim}<|eot_id|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>        (each turn)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                              (generation prompt)

Choices made here:
- `encode(text)` adds no BOS (the chat template writes `<|begin_of_text|>` itself) and, as HF
  does, encodes special-token strings found in the text as their single ids.
- The reasoning toggle is the system prompt `detailed thinking on|off`; `thinking=` writes it, so
  passing a system message as well is an error rather than a silent choice between the two.
- Assistant turns in the history keep only the text after `</think>` (the template's rule);
  `encode_chat` keeps the *last* assistant turn whole, since for SFT it is the target.
- Think markers: `think_open_ids` / `think_close_ids` are the standalone encodings of `<think>` /
  `</think>`, which is also how they tokenize at the start of a response or after a newline. In
  running text byte-level BPE may glue whitespace to the ends (`">\\n\\n"` is one Llama token,
  and so is `" </"`), so `think_tokens` also accepts those spellings when the sampler *detects*
  the markers; the canonical close ids are what it forces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from nemotron_jax.fileio import atomic_write_text
from nemotron_jax.sampling.think import ThinkTokens

BOS, EOT, HEADER_START, HEADER_END = "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_EOS_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
_PAD_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>")
Message = Mapping[str, str]


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """A `tokenizers.Tokenizer` with Llama-3 special tokens and the Nemotron chat template."""

    def __init__(self, backend: Any, config: Mapping[str, Any] | None = None, name: str = "<tokenizer>"):
        self.backend, self.config, self.name = backend, dict(config or {}), name
        self.bos_id = self._required_id(self.config.get("bos_token") or BOS)
        for token in (EOT, HEADER_START, HEADER_END):
            self._required_id(token)
        eos = {self.backend.token_to_id(t) for t in (*_EOS_NAMES, self._token_text(self.config.get("eos_token")))
               if t is not None}
        self.eos_ids: tuple[int, ...] = tuple(sorted(i for i in eos if i is not None))
        pads = [self.backend.token_to_id(t) for t in _PAD_NAMES]
        self.pad_id: int | None = next((i for i in pads if i is not None), None)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A tokenizer.json (or a directory holding one, with tokenizer_config.json beside it when
        present), or the name `tiny` for the built-in tokenizer of the tiny presets."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if str(path) == "tiny":
            from nemotron_jax.presets import configs_dir

            path = configs_dir() / "tokenizers" / "tiny"
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json there")
        config_file = file.parent / "tokenizer_config.json"
        try:
            backend = Backend.from_file(str(file))
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except Exception as e:  # the tokenizers library raises bare Exceptions on bad files
            raise ValueError(f"{file}: cannot read tokenizer ({e})") from None
        return cls(backend, config, name=str(file))

    @classmethod
    def tiny(cls) -> Tokenizer:
        """The 512-token byte-level BPE of the tiny presets (`scripts/make_tiny_tokenizer.py`)."""
        return cls.from_file("tiny")

    def save(self, directory: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json into `directory` (beside an exported checkpoint)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(self.config, indent=2) + "\n")
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str())

    # ---------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their single ids. No BOS unless asked."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ---------------------------------------------------------------- chat template
    def render_chat(self, messages: Sequence[Message], thinking: bool | None = None,
                    add_generation_prompt: bool = True, keep_last_thinking: bool = False,
                    ) -> tuple[str, list[tuple[int, int]]]:
        """The prompt string, and the [start, end) character span of each assistant turn's content
        plus its `<|eot_id|>`. `keep_last_thinking` keeps the last assistant turn's `<think>` part."""
        messages = _check_messages(messages)
        system = ""
        if messages and messages[0]["role"] == "system":
            if thinking is not None:
                raise ValueError("pass either a system message or thinking=, not both: the reasoning toggle "
                                 "is the system prompt ('detailed thinking on/off')")
            system, messages = messages[0]["content"], messages[1:]
        elif thinking is not None:
            system = f"detailed thinking {'on' if thinking else 'off'}"
        bos = self._token_text(self.config.get("bos_token")) or BOS
        parts = [f"{bos}{HEADER_START}system{HEADER_END}\n\n{system.strip()}{EOT}"]
        spans, length = [], len(parts[0])
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        for i, m in enumerate(messages):
            content = m["content"]
            if m["role"] == "assistant" and not (keep_last_thinking and i == last_assistant):
                content = content.split(THINK_CLOSE)[-1]
            head = f"{HEADER_START}{m['role']}{HEADER_END}\n\n"
            body = f"{content.strip()}{EOT}"
            if m["role"] == "assistant":
                spans.append((length + len(head), length + len(head) + len(body)))
            parts.append(head + body)
            length += len(head) + len(body)
        if add_generation_prompt:
            parts.append(f"{HEADER_START}assistant{HEADER_END}\n\n")
        return "".join(parts), spans

    def apply_chat_template(self, messages: Sequence[Message], thinking: bool | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation (special tokens as single ids, BOS included)."""
        text, _ = self.render_chat(messages, thinking, add_generation_prompt)
        return self.encode(text)

    def encode_chat(self, messages: Sequence[Message], thinking: bool | None = None) -> tuple[list[int], list[bool]]:
        """(ids, loss mask) for SFT: the mask is True exactly on each assistant turn's content as
        rendered (the last one with its `<think>` part) and the `<|eot_id|>` that closes it."""
        text, spans = self.render_chat(messages, thinking, add_generation_prompt=False, keep_last_thinking=True)
        enc = self.backend.encode(text, add_special_tokens=False)
        mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
        return list(enc.ids), mask

    # ---------------------------------------------------------------- think markers
    @cached_property
    def think_open_ids(self) -> list[int]:
        return self.encode(THINK_OPEN)

    @cached_property
    def think_close_ids(self) -> list[int]:
        return self.encode(THINK_CLOSE)

    @cached_property
    def think_tokens(self) -> ThinkTokens:
        """Marker patterns for the sampler: canonical ids first, plus the whitespace-glued
        spellings of the first and last token (byte-level vocabularies only)."""
        return ThinkTokens(self._marker_pattern(self.think_open_ids), self._marker_pattern(self.think_close_ids))

    def _marker_pattern(self, ids: list[int]) -> tuple[tuple[int, ...], ...]:
        pattern = [[i] for i in ids]
        table = _byte_level_alphabet()
        space = {table[b] for b in b" \t\n\r"}
        vocab = self.backend.get_vocab(with_added_tokens=False)
        pieces = [self.backend.id_to_token(i) for i in ids]
        if any(p is None or not set(p) <= set(table.values()) for p in pieces):
            return tuple(tuple(p) for p in pattern)  # not a byte-level vocabulary: exact matching only
        for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i == ids[0] or i == ids[-1]:
                continue
            if token.endswith(pieces[0]) and len(token) > len(pieces[0]) and set(token[:-len(pieces[0])]) <= space:
                pattern[0].append(i)
            if token.startswith(pieces[-1]) and len(token) > len(pieces[-1]) and set(token[len(pieces[-1]):]) <= space:
                pattern[-1].append(i)
        return tuple(tuple(p) for p in pattern)

    # ---------------------------------------------------------------- internals
    def _required_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.name}: special token {token!r} is missing (a Llama-3 style tokenizer is needed)")
        return i

    @staticmethod
    def _token_text(token: Any) -> str | None:
        return token.get("content") if isinstance(token, Mapping) else token

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab {self.vocab_size}, bos {self.bos_id}, eos {list(self.eos_ids)})"


def _check_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        if not m["role"] or any(s in m["role"] for s in (HEADER_START, HEADER_END, EOT, "\n")):
            raise ValueError(f"message {i}: invalid role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out
