"""Rollouts: sample G responses per prompt from the current policy, score them, build a train batch.

Generation runs the engine (continuous batching, each group's prompt prefilled once) directly on
the trainer's parameters (no copy through disk or host); with a separate rollout layout they are
resharded in device memory first. Rewards run on
host with a timeout per sample. The batch rows are prompt+response sequences whose targets are
weighted only on response tokens, with the sampler's log-probabilities as the old policy.
Legend: P prompts, G responses per prompt, B = P*G rows, T tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax import rewards
from nemotron_jax.api import Model
from nemotron_jax.data.batch import PolicyBatch
from nemotron_jax.eval import benchmarks
from nemotron_jax.quantize import QArray
from nemotron_jax.rl.objectives import Aggregation, aggregation_weights, group_advantages
from nemotron_jax.sharding import Layout
from nemotron_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One RL prompt: the user turn, the reference answer, its reasoning mode, and for benchmark
    prompts the record and benchmark whose grader scores the responses."""

    question: str
    answer: str
    thinking: bool
    record: dict[str, Any] | None = dataclasses.field(default=None, hash=False, compare=False)
    benchmark: str = ""

    def messages(self) -> list[dict[str, str]]:
        if self.benchmark:
            return benchmarks.get(self.benchmark).messages(self.record)
        return [{"role": "user", "content": self.question}]

    def accuracy(self, response: str) -> float:
        """The same grading as evaluation: the benchmark's grader, or the numeric answer check."""
        if self.benchmark:
            return benchmarks.get(self.benchmark).score(response, self.record, self.thinking)
        return rewards.accuracy(response, self.answer, self.thinking)


@dataclasses.dataclass
class Rollout:
    prompts: list[Prompt]          # P
    prompt_ids: list[list[int]]    # B (each prompt repeated G times)
    responses: list[list[int]]     # B new tokens (ending with the stop token, if one was hit)
    logprobs: list[list[float]]    # B raw log-probabilities of those tokens
    texts: list[str]               # B decoded responses (special tokens dropped)
    rewards: np.ndarray            # [P, G]
    accuracy: np.ndarray           # [P, G]
    format: np.ndarray             # [P, G]
    reward_errors: list[str]
    seconds: float
    scoring_seconds: float


def reshard_params(params: nnx.State, graphdef: nnx.GraphDef, layout: Layout | None) -> nnx.State:
    """The same weights laid out for another mesh (e.g. a rollout mesh), moved device-to-device:
    every variable by its own logical axes (base weights and LoRA adapters alike)."""
    if layout is None:
        return params
    del graphdef  # the variables carry their logical axes themselves

    def move(v: nnx.Variable) -> nnx.Variable:
        value = v.get_value()
        if not hasattr(v, "logical_axes") or not hasattr(value, "shape") or isinstance(value, QArray):
            if isinstance(value, QArray):
                raise ValueError("a separate rollout mesh is not supported for quantized weights yet; "
                                 "drop sampling.rollout_mesh or model.quantize")
            return v
        return v.replace(jax.device_put(value, layout.sharding(v.logical_axes, value.shape)))

    return nnx.from_flat_state([(p, move(v)) for p, v in nnx.to_flat_state(params)])


def rollout(policy: Model, tokenizer: Tokenizer, prompts: Sequence[Prompt], group_size: int, max_new_tokens: int,
            *, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
            reward_fn: Callable[..., float] | None = None, format_weight: float = 1.0,
            reward_timeout_s: float = 10.0, max_thinking_tokens: int | None = None) -> Rollout:
    """Sample `group_size` responses for every prompt with the engine (`policy.generate(n=...)`:
    each group's prompt is prefilled once, its pages shared) and score them: reward = accuracy +
    `format_weight`·format (SPEC §4), or a user `reward_fn(response, answer, thinking, prompt)`
    run with a timeout per sample."""
    unique = [tokenizer.apply_chat_template(p.messages(), thinking=p.thinking) for p in prompts]
    prompt_ids = [ids for ids in unique for _ in range(group_size)]
    options: dict[str, Any] = {}
    if max_thinking_tokens is not None:
        options = {"max_thinking_tokens": max_thinking_tokens, "think_tokens": tokenizer.think_tokens}
    start = time.perf_counter()
    tokens, logprobs = policy.generate(unique, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                       stop_tokens=list(tokenizer.eos_ids), return_logprobs=True, n=group_size,
                                       **options)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    eos = set(tokenizer.eos_ids)
    texts = [tokenizer.decode([t for t in r if t not in eos], skip_special_tokens=True) for r in tokens]
    owners = [p for p in prompts for _ in range(group_size)]
    accuracy = np.asarray([p.accuracy(t) for t, p in zip(texts, owners, strict=True)], np.float64)
    fmt = np.asarray([rewards.format(t, p.thinking) for t, p in zip(texts, owners, strict=True)], np.float64)
    errors: list[str] = []
    if reward_fn is None:
        scores = (accuracy + format_weight * fmt).astype(np.float32)
    else:
        samples = [{"response": t, "answer": p.answer, "thinking": p.thinking, "prompt": p.question}
                   for t, p in zip(texts, owners, strict=True)]
        scored = rewards.score_all(reward_fn, samples, timeout_s=reward_timeout_s)
        scores = np.asarray(scored.scores, np.float32)
        errors = [f"sample {i}: {e}" for i, e in enumerate(scored.errors) if e]
    shape = (len(prompts), group_size)
    return Rollout(list(prompts), prompt_ids, tokens, logprobs, texts, scores.reshape(shape),
                   accuracy.reshape(shape), fmt.reshape(shape), errors, seconds, time.perf_counter() - start)


def bucket(n: int, multiple: int = 64) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def informative_rows(r: Rollout) -> list[int]:
    """Rows of the groups whose rewards differ. A group with all-equal rewards has zero advantage
    everywhere and, without a KL term, contributes no gradient (DAPO's dynamic sampling drops it)."""
    group = r.rewards.shape[1]
    keep = np.flatnonzero(np.ptp(r.rewards, axis=1) > 0)
    return [int(p) * group + g for p in keep for g in range(group)]


def policy_batch(r: Rollout, advantages_PxG: np.ndarray, aggregation: Aggregation,
                 seq_len: int | None = None, rows: Sequence[int] | None = None,
                 num_rows: int | None = None) -> PolicyBatch:
    """Rows prompt+response; targets weighted on response tokens only; old log-probs aligned to them.

    `rows` selects a subset of the rollout's rows; `num_rows` pads the batch with weightless rows
    to a fixed count (with a fixed `seq_len`, one compiled update serves every iteration)."""
    rows = list(range(len(r.responses))) if rows is None else list(rows)
    lengths = [len(r.prompt_ids[i]) + len(r.responses[i]) for i in rows]
    t = seq_len or bucket(max(lengths, default=2) - 1)
    b = max(len(rows), num_rows or 0)
    inputs, targets = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    mask, old = np.zeros((b, t), np.float32), np.zeros((b, t), np.float32)
    adv = np.zeros((b, t), np.float32)
    segment = np.zeros((b, t), np.int32)
    flat_adv = advantages_PxG.reshape(-1)
    for i, row in enumerate(rows):
        prompt, response, logprobs = r.prompt_ids[row], r.responses[row], r.logprobs[row]
        seq = np.asarray(prompt + response, np.int32)[: t + 1]
        n = len(seq) - 1
        inputs[i, :n], targets[i, :n], segment[i, :n] = seq[:-1], seq[1:], 1
        first = len(prompt) - 1  # target index of the first response token
        k = max(0, min(len(response), n - first))
        mask[i, first:first + k] = 1.0
        old[i, first:first + k] = logprobs[:k]
        adv[i, first:first + k] = flat_adv[row]
    weights = np.asarray(aggregation_weights(jnp.asarray(mask), aggregation))
    return PolicyBatch(inputs=inputs, targets=targets, weights=weights,
                       positions=np.broadcast_to(np.arange(t), (b, t)).copy(), segment_ids=segment,
                       old_logprobs=old, advantages=adv)


def advantages_for(r: Rollout, kind: str, normalize_std: bool) -> np.ndarray:
    return np.asarray(group_advantages(jnp.asarray(r.rewards), kind, normalize_std))


def rollout_metrics(r: Rollout) -> dict[str, float]:
    """Reward, accuracy, format and length per toggle mode, plus rollout/scoring speed."""
    out: dict[str, float] = {}
    thinking = np.asarray([p.thinking for p in r.prompts])
    lengths = np.asarray([len(s) for s in r.responses], np.float32).reshape(r.rewards.shape)
    for name, sel in (("", np.ones_like(thinking)), ("_on", thinking), ("_off", ~thinking)):
        if not sel.any():
            continue
        out[f"reward_mean{name}"] = float(r.rewards[sel].mean())
        out[f"reward_std{name}"] = float(r.rewards[sel].std())
        out[f"accuracy{name}"] = float(r.accuracy[sel].mean())
        out[f"format_rate{name}"] = float(r.format[sel].mean())
        out[f"response_length{name}"] = float(lengths[sel].mean())
    total = float(lengths.sum())
    out.update(rollout_s=r.seconds, rollout_tokens_per_s=total / max(r.seconds, 1e-9), scoring_s=r.scoring_seconds,
               reward_errors=float(len(r.reward_errors)))
    return out
