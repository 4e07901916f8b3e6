"""Reasoning evaluation: generate answers with our sampler, score accuracy and format per mode.

Question/answer records (GSM8K style: the answer after `####`) are rendered with the chat
template and the `detailed thinking on|off` system prompt, generated in batches (each batch sharded
over the model's mesh by the sampler), and scored by the `gsm8k` benchmark grader (`eval.protocol`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from nemotron_jax.api import Model
from nemotron_jax.eval import benchmarks, protocol
from nemotron_jax.eval.protocol import MODE_SAMPLING
from nemotron_jax.tokenizer import Tokenizer

__all__ = ["MODE_SAMPLING", "ModeReport", "evaluate_reasoning"]


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
    """Accuracy, format compliance, response length and decode speed over `records` in one mode:
    the `gsm8k` grader on the bare question (the synthetic tasks' format), one sample each."""
    if not records:
        raise ValueError("no question/answer records to evaluate")
    bench = benchmarks.get("gsm8k", template="{question}")
    rows, timing = protocol.run(model, tokenizer, bench, records, thinking, samples=1, max_new_tokens=max_new_tokens,
                                max_thinking_tokens=max_thinking_tokens, batch_size=batch_size,
                                temperature=temperature, top_p=top_p, seed=seed, progress=progress)
    summary = protocol.summarize(bench, rows, timing)
    return ModeReport(name, summary["mode"], summary["examples"], summary["accuracy"], summary["format_rate"],
                      summary["mean_response_tokens"], summary["tokens_per_s"],
                      model.config.kv_cache_bytes_per_token("bfloat16"), model.config.num_params())
