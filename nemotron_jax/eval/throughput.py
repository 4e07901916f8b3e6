"""Serving throughput through the engine: what a Puzzle child saves, measured where it shows.

Each model serves the same fixed workload, `requests` concurrent requests of `prompt_tokens` random
prompt tokens and exactly `new_tokens` greedy new tokens each (no stop token), through
`Model.generate` (the engine: continuous batching over the paged cache). At that load the decode
step reads every running request's KV pages, so removing attention layers or KV heads shortens
it; a single short batch (what the evaluation's own timing sees) is dominated by fixed overhead.
The models are timed round-robin after a warm-up call each, and a model's speed-up over the first
is the median of per-round ratios: a burst of load from other processes moves both sides of a
ratio, not one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


def engine_throughput(models: Mapping[str, Any], *, requests: int = 32, prompt_tokens: int = 192,
                      new_tokens: int = 32, rounds: int = 3, seed: int = 0) -> dict[str, dict[str, float]]:
    """{name: {"engine_tokens_per_s": median new tokens/s, "engine_speedup": median ratio to the
    first model}} for `models` (name -> `nemotron_jax.Model`, all the same vocabulary)."""
    if not models or requests < 1 or new_tokens < 1 or rounds < 1 or prompt_tokens < 1:
        raise ValueError("engine_throughput needs models, and requests, prompt_tokens, new_tokens, rounds >= 1")
    first = next(iter(models.values())).config
    limit = min(m.config.max_position_embeddings for m in models.values())
    if prompt_tokens + new_tokens > limit:
        raise ValueError(f"prompt_tokens {prompt_tokens} + new_tokens {new_tokens} exceed the models' "
                         f"max_position_embeddings ({limit})")
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, first.vocab_size, (requests, prompt_tokens)).tolist()

    def serve(model: Any) -> float:
        start = time.perf_counter()
        out = model.generate(prompts, new_tokens, stop_tokens=[])
        seconds = time.perf_counter() - start
        assert sum(map(len, out)) == requests * new_tokens
        return seconds

    for model in models.values():
        serve(model)  # compile and warm the engine's buckets
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(serve(model))
    base = next(iter(times.values()))
    tokens = requests * new_tokens
    return {name: {"engine_tokens_per_s": tokens / statistics.median(t),
                   "engine_speedup": statistics.median(b / x for b, x in zip(base, t, strict=True))}
            for name, t in times.items()}
