"""Records -> token ids + loss mask: plain text, chat (the Llama-Nemotron post-training schema,
or `messages`), and GSM8K rendered as a reasoning-toggled chat.

Formats (`kind`, or `auto` to recognise each record by its keys):
- `text`      {text}: BOS + text + end-of-text, every token a target (pretraining / CPT / KD).
- `chat`      {input, output, reasoning?, system_prompt?} (SPEC §5: `input` is a list of
              {role, content} or, in early versions, a string) or {messages: [...]}; the loss
              mask covers the assistant content and its <|eot_id|> only.
- `gsm8k`     {question, answer}: the worked solution (calculator marks `<<…>>` removed) becomes
              `<think>solution</think>The answer is X.` when reasoning is on and just
              `The answer is X.` when off.

The reasoning toggle is the system prompt `detailed thinking on|off` (SPEC §3). `reasoning`:
`on` / `off` force it; `auto` takes it from the record (`system_prompt`, else `reasoning`), and
for GSM8K records that carry neither it alternates by record index (even on, odd off) so both
modes are trained on.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from nemotron_jax.data.packing import Example
from nemotron_jax.data.sources import Record
from nemotron_jax.tokenizer import THINK_CLOSE, THINK_OPEN, Tokenizer

Kind = Literal["auto", "text", "chat", "gsm8k"]
Reasoning = Literal["auto", "on", "off"]
_CALCULATOR = re.compile(r"<<[^>]*>>")
_TOGGLE = {"on": "detailed thinking on", "off": "detailed thinking off"}


@dataclasses.dataclass(frozen=True)
class ExampleFormat:
    kind: Kind = "auto"
    text_field: str = "text"
    reasoning: Reasoning = "auto"


def record_kind(fmt: ExampleFormat, record: Record) -> str:
    if fmt.kind != "auto":
        return fmt.kind
    if ("input" in record and "output" in record) or "messages" in record:
        return "chat"
    if "question" in record and "answer" in record:
        return "gsm8k"
    if fmt.text_field in record:
        return "text"
    raise ValueError(f"cannot tell the format of a record with keys {sorted(record)}: expected "
                     f"{fmt.text_field!r} (text), input+output or messages (chat), or question+answer (gsm8k)")


def _string(record: Record, key: str) -> str:
    if key not in record:
        raise ValueError(f"missing field {key!r}")
    if not isinstance(record[key], str):
        raise ValueError(f"field {key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]


def _record_toggle(record: Record) -> str | None:
    """'on' / 'off' from the record's system_prompt or reasoning field, None when it has neither."""
    prompt = record.get("system_prompt")
    if prompt is not None:
        for mode, text in _TOGGLE.items():
            if str(prompt).strip() == text:
                return mode
    value = record.get("reasoning")
    if value is None:
        return None
    if value not in ("on", "off"):
        raise ValueError(f"field 'reasoning' must be 'on' or 'off', got {value!r}")
    return value


def _mode(fmt: ExampleFormat, record: Record, index: int, alternate: bool) -> str | None:
    if fmt.reasoning != "auto":
        return fmt.reasoning
    mode = _record_toggle(record)
    if mode is None and alternate:
        return "on" if index % 2 == 0 else "off"
    return mode


def _chat_messages(fmt: ExampleFormat, record: Record, index: int) -> list[dict[str, str]]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("field 'messages' must be a non-empty list of {role, content}")
        turns = [dict(m) for m in messages]
    else:
        prompt = record["input"]
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(turns, list) or not turns:
            raise ValueError("field 'input' must be a string or a non-empty list of {role, content}")
        turns = [*(dict(m) if isinstance(m, dict) else m for m in turns),
                 {"role": "assistant", "content": _string(record, "output")}]
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be an object with string 'role' and 'content'")
    if turns[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant turn (the training target)")
    mode = _mode(fmt, record, index, alternate=False)
    system = [m for m in turns if m["role"] == "system"]
    if mode is None:
        prompt = record.get("system_prompt")
        if prompt is not None and not system:
            turns = [{"role": "system", "content": str(prompt)}, *turns]
        return turns
    turns = [m for m in turns if m["role"] != "system"]
    answer = turns[-1]["content"]
    if mode == "off" and THINK_CLOSE in answer:
        turns[-1] = {"role": "assistant", "content": answer.split(THINK_CLOSE)[-1].strip()}
    if mode == "on" and THINK_OPEN not in answer:
        raise ValueError("reasoning is on but the output has no <think>…</think>")
    return [{"role": "system", "content": _TOGGLE[mode]}, *turns]


def gsm8k_answer(answer: str, thinking: bool) -> str:
    """`<think>solution</think>The answer is X.` (thinking) or `The answer is X.`."""
    if "####" not in answer:
        raise ValueError("GSM8K 'answer' has no '#### <final answer>' line")
    solution, final = answer.rsplit("####", 1)
    solution, final = _CALCULATOR.sub("", solution).strip(), final.strip().replace(",", "")
    if not final:
        raise ValueError("GSM8K 'answer' has an empty final answer after '####'")
    reply = f"The answer is {final}."
    return f"{THINK_OPEN}{solution}{THINK_CLOSE}{reply}" if thinking else reply


def _gsm8k_messages(fmt: ExampleFormat, record: Record, index: int) -> list[dict[str, str]]:
    question, answer = _string(record, "question"), _string(record, "answer")
    mode = _mode(fmt, record, index, alternate=True)
    return [{"role": "system", "content": _TOGGLE[mode]}, {"role": "user", "content": question},
            {"role": "assistant", "content": gsm8k_answer(answer, mode == "on")}]


def messages_for(fmt: ExampleFormat, record: Record, index: int = 0) -> list[dict[str, str]]:
    """The conversation a chat or GSM8K record trains on (system toggle first when known)."""
    kind = record_kind(fmt, record)
    if kind == "chat":
        return _chat_messages(fmt, record, index)
    if kind == "gsm8k":
        return _gsm8k_messages(fmt, record, index)
    raise ValueError(f"a {kind} record is not a conversation")


def checker(fmt: ExampleFormat) -> Callable[[Record], None]:
    """Validation run on every record when a source is opened (cheap: no tokenisation)."""
    def check(record: Record) -> None:
        if record_kind(fmt, record) == "text":
            _string(record, fmt.text_field)
        else:
            messages_for(fmt, record)
    return check


def make_example(tokenizer: Tokenizer, fmt: ExampleFormat, record: Record, index: int = 0) -> Example:
    """Token ids and loss mask of one record (see the module docstring for what is masked)."""
    if record_kind(fmt, record) == "text":
        end = tokenizer.token_id("<|end_of_text|>")
        end = tokenizer.eos_ids[0] if end is None else end
        ids = [tokenizer.bos_id, *tokenizer.encode(_string(record, fmt.text_field)), end]
        return Example(np.asarray(ids, np.int32), np.ones(len(ids), bool))
    ids, mask = tokenizer.encode_chat(messages_for(fmt, record, index))
    return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def describe(tokenizer: Tokenizer, example: Example) -> dict[str, Any]:
    """The text of an example and of its loss-masked part, for eyeballing a data pipeline."""
    ids, mask = example
    return {"text": tokenizer.decode(ids), "target_text": tokenizer.decode(ids[mask]),
            "tokens": len(ids), "target_tokens": int(mask.sum())}
