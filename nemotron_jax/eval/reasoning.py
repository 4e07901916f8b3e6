"""Reasoning evaluation: generate answers with our sampler, score accuracy and format per mode.

Question/answer records (GSM8K style: the answer after `####`) are rendered with the chat
template and the `detailed thinking on|off` system prompt, generated in batches (each batch sharded
over the model's mesh by the sampler), and scored with `nemotron_jax.rewards`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from nemotron_jax import rewards
from nemotron_jax.api import Model
from nemotron_jax.tokenizer import Tokenizer

# Recommended decoding per mode (SPEC §3): on 0.6 / 0.95, off greedy.
MODE_SAMPLING = {True: {"temperature": 0.6, "top_p": 0.95}, False: {"temperature": 0.0, "top_p": 1.0}}


@dataclasses.dataclass(frozen=True)
class ModeReport:
    """One row of the evaluation table: one model in one reasoning mode."""

    model: str
    mode: str
    examples: int
    accuracy: float
    format_rate: float
    mean_response_tokens: float
    tokens_per_s: float
    kv_cache_bytes_per_token: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate_reasoning(model: Model, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], thinking: bool, *,
                       name: str = "model", max_new_tokens: int = 256, batch_size: int = 32,
                       temperature: float | None = None, top_p: float | None = None, seed: int = 0,
                       max_thinking_tokens: int | None = None, progress: bool = True) -> ModeReport:
    """Accuracy, format compliance, response length and decode speed over `records` in one mode."""
    if not records:
        raise ValueError("no question/answer records to evaluate")
    sampling = dict(MODE_SAMPLING[thinking])
    if temperature is not None:
        sampling["temperature"] = temperature
    if top_p is not None:
        sampling["top_p"] = top_p
    options: dict[str, Any] = {}
    if max_thinking_tokens is not None and thinking:
        options = {"max_thinking_tokens": max_thinking_tokens, "think_tokens": tokenizer.think_tokens}
    stops = [i for i in tokenizer.eos_ids if i < model.config.vocab_size] or None
    correct = formatted = tokens = 0
    timed_tokens, timed_seconds = 0, 0.0
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    mode = "on" if thinking else "off"
    for b, batch in enumerate(tqdm(batches, desc=f"eval {name} thinking {mode}", unit="batch", disable=not progress)):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], thinking=thinking)
                   for r in batch]
        padded = prompts + [prompts[0]] * (min(batch_size, len(records)) - len(prompts))  # one compiled shape
        start = time.perf_counter()
        outputs = model.generate(padded, max_new_tokens, seed=seed + b, stop_tokens=stops, **sampling, **options)
        seconds = time.perf_counter() - start
        outputs = outputs[:len(prompts)]
        new = sum(len(o) for o in outputs)
        if b > 0 or len(batches) == 1:  # the first of several batches pays for compilation
            timed_tokens, timed_seconds = timed_tokens + new, timed_seconds + seconds
        for record, out in zip(batch, outputs, strict=True):
            text = tokenizer.decode([t for t in out if t not in tokenizer.eos_ids], skip_special_tokens=True)
            correct += rewards.accuracy(text, str(record["answer"]), thinking)
            formatted += rewards.format(text, thinking)
            tokens += len(out)
    n = len(records)
    return ModeReport(name, mode, n, correct / n, formatted / n, tokens / n,
                      timed_tokens / timed_seconds if timed_seconds else 0.0,
                      model.config.kv_cache_bytes_per_token("bfloat16"), model.config.num_params())
