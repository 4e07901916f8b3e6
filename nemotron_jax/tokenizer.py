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

Chat templates from the tokenizer: a `chat_template` in tokenizer_config.json (or a
`chat_template.jinja` beside it) is rendered with jinja2 the way transformers' `apply_chat_template`
renders it (a sandboxed environment with `trim_blocks`/`lstrip_blocks`, `raise_exception`,
`strftime_now`, a non-escaping `tojson`, the special tokens as variables), so a later Nemotron
release brings its own template and toggle. `chat_template="auto"` (the default) takes the file's
template when it has a reasoning toggle this module can drive, else the built-in v1 template above
(a plain Llama-3 template has no toggle, and this project's models are trained on v1 prompts);
`"v1"` / `"file"` / a jinja source force a choice. `thinking=` maps to the template's own toggle:
`enable_thinking` (a template variable), `/think` | `/no_think` or `detailed thinking on|off` (the
system prompt). `NEMOTRON_V1_TEMPLATE` is the v1 template in jinja, written into HF exports.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from nemotron_jax.fileio import atomic_write_text
from nemotron_jax.sampling.think import ThinkTokens

BOS, EOT, HEADER_START, HEADER_END = "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_EOS_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
_PAD_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>")
Message = Mapping[str, str]
Toggle = Literal["flag", "slash", "system"]
# The named special tokens transformers passes to a chat template as variables.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The Llama-Nemotron v1 template (SPEC §3) in jinja: renders exactly what `render_chat` writes.
NEMOTRON_V1_TEMPLATE = (
    "{#- reasoning toggle: the system prompt 'detailed thinking on' or 'detailed thinking off' -#}\n"
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system | trim + '<|eot_id|>' -}}"
    "{%- for message in turns -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


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

    def __init__(self, backend: Any, config: Mapping[str, Any] | None = None, name: str = "<tokenizer>",
                 chat_template: str = "auto"):
        self.backend, self.config, self.name = backend, dict(config or {}), name
        self._template, self.toggle = _choose_template(chat_template, self.config.get("chat_template"), name)
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
    def from_file(cls, path: str | Path, chat_template: str = "auto") -> Tokenizer:
        """A tokenizer.json (or a directory holding one, with tokenizer_config.json and
        chat_template.jinja beside it when present), or the name `tiny` for the built-in tokenizer
        of the tiny presets. `chat_template`: "auto" | "v1" | "file" | a jinja source (module doc)."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if str(path) == "tiny":
            from nemotron_jax.presets import configs_dir

            path = configs_dir() / "tokenizers" / "tiny"
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json there")
        config_file, jinja_file = file.parent / "tokenizer_config.json", file.parent / "chat_template.jinja"
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the tokenizers library raises bare Exceptions on bad files
            raise ValueError(f"{file}: cannot read tokenizer ({e})") from None
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object")
        if jinja_file.is_file():  # transformers' newer layout; it wins over the config key, as there
            config["chat_template"] = jinja_file.read_text()
        return cls(backend, config, name=str(file), chat_template=chat_template)

    @classmethod
    def tiny(cls) -> Tokenizer:
        """The 512-token byte-level BPE of the tiny presets (`scripts/make_tiny_tokenizer.py`)."""
        return cls.from_file("tiny")

    def save(self, directory: str | Path) -> None:
        """The `hf_files()` into `directory` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.hf_files().items():
            atomic_write_text(directory / name, text)

    def hf_files(self) -> dict[str, str]:
        """tokenizer.json, tokenizer_config.json (with the chat template in use, so that
        transformers' `apply_chat_template` gives our ids) and special_tokens_map.json, by name."""
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config.setdefault("bos_token", self.backend.id_to_token(self.bos_id))
        config.setdefault("eos_token", EOT)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config["chat_template"] = self.chat_template
        special = {k: config[k] for k in _SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        return {"tokenizer.json": self.backend.to_str(),
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False) + "\n"}

    @property
    def chat_template(self) -> str:
        """The jinja source of the template in use (the built-in one as `NEMOTRON_V1_TEMPLATE`)."""
        return self._template or NEMOTRON_V1_TEMPLATE

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
        plus its `<|eot_id|>`. `keep_last_thinking` keeps the last assistant turn's `<think>` part
        (built-in template; a file's template decides that itself)."""
        messages = _check_messages(messages)
        if self._template is not None:
            messages, variables = self._with_toggle(messages, thinking)
            text = self._render(messages, add_generation_prompt, variables)
            return text, self._assistant_spans(messages, variables, text)
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
        if self._template is None:
            text, _ = self.render_chat(messages, thinking, add_generation_prompt)
        else:  # no assistant spans needed: one render
            messages, variables = self._with_toggle(_check_messages(messages), thinking)
            text = self._render(messages, add_generation_prompt, variables)
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

    # ---------------------------------------------------------------- a file's jinja template
    def _with_toggle(self, messages: list[dict[str, str]], thinking: bool | None,
                     ) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """(messages, extra template variables) that set the template's own reasoning toggle."""
        if thinking is None:
            return messages, {}
        if self.toggle is None:
            raise ValueError(f"{self.name}: the chat template has no reasoning toggle (enable_thinking, "
                             "/think, 'detailed thinking'); pass thinking=None")
        if self.toggle == "flag":
            return messages, {"enable_thinking": bool(thinking)}
        prompt = ("/think" if thinking else "/no_think") if self.toggle == "slash" else \
            f"detailed thinking {'on' if thinking else 'off'}"
        if messages and messages[0]["role"] == "system":
            raise ValueError(f"pass either a system message or thinking=, not both: the reasoning toggle "
                             f"is the system prompt ({prompt!r})")
        return [{"role": "system", "content": prompt}, *messages], {}

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, variables: Mapping[str, Any],
                ) -> str:
        """The template rendered with what transformers passes: messages, tools/documents (None),
        add_generation_prompt, the named special tokens, then the extra variables."""
        import jinja2

        special = {k: t for k in _SPECIAL_TOKEN_KEYS if (t := self._token_text(self.config.get(k))) is not None}
        try:
            return _compile(self._template).render(messages=messages, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt,
                                                   **{**special, **variables})
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.name}: the chat template failed: {e}") from None

    def _assistant_spans(self, messages: list[dict[str, str]], variables: Mapping[str, Any], text: str,
                         ) -> list[tuple[int, int]]:
        """Each assistant turn's span in `text`: what rendering the turn adds to the history after
        the generation prompt. A template that re-renders a turn once later turns follow has no
        well-defined span for it, and says so rather than mask the wrong tokens."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = (self._render(messages[:j], False, variables) for j in (i, i + 1))
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ValueError(f"{self.name}: the chat template renders assistant turn {i} differently once "
                                 "later turns follow, so its loss mask is ambiguous; end the conversation there")
            prompt = self._render(messages[:i], True, variables)
            start = next((k for k, (a, b) in enumerate(zip(prompt, upto, strict=False)) if a != b),
                         min(len(prompt), len(upto)))
            spans.append((start, len(upto)))
        return spans

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


# ---------------------------------------------------------------- chat templates (jinja)
def _choose_template(choice: str, file_template: Any, where: str) -> tuple[str | None, Toggle | None]:
    """(the jinja source to render, None for the built-in v1; its reasoning toggle)."""
    if isinstance(file_template, list):  # transformers' named templates: the default one
        named = {t.get("name"): t.get("template") for t in file_template if isinstance(t, Mapping)}
        file_template = named.get("default")
    if file_template is not None and not isinstance(file_template, str):
        raise ValueError(f"{where}: tokenizer_config.json chat_template must be a string or a list of "
                         "{name, template} with a 'default' one")
    if choice == "v1" or (choice == "auto" and (not file_template or file_template == NEMOTRON_V1_TEMPLATE)):
        return None, "system"  # our own export reads back as the built-in (which keeps the SFT target's <think>)
    if choice in ("auto", "file"):
        if not file_template:
            raise ValueError(f"{where}: chat_template='file' but tokenizer_config.json has no chat_template")
        source = file_template
    elif isinstance(choice, str) and ("{{" in choice or "{%" in choice):
        source = choice
    else:
        raise ValueError(f"chat_template must be 'auto', 'v1', 'file' or a jinja template, got {choice!r}")
    try:
        toggle = _toggle(source)
    except Exception as e:  # jinja2.TemplateSyntaxError, with its line
        raise ValueError(f"{where}: the chat template is not valid jinja ({e})") from None
    if choice == "auto" and toggle is None:  # e.g. a plain Llama-3 template: no reasoning switch
        return None, "system"
    return source, toggle


def _toggle(source: str) -> Toggle | None:
    """Which reasoning switch a template reads: an `enable_thinking` variable (a free one: templates
    also keep a `namespace(enable_thinking=...)` set from the system prompt), a slash command, or the
    v1 system prompt."""
    from jinja2 import meta

    if "enable_thinking" in meta.find_undeclared_variables(_compile(source).environment.parse(source)):
        return "flag"
    if "/no_think" in source:
        return "slash"
    if "detailed thinking" in source:
        return "system"
    return None


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    """The template in the environment transformers renders chat templates in (a sandbox, since
    templates come from the Hub; `{% generation %}` blocks render their body)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # jinja's own escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)
