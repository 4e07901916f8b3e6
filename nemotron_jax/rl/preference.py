"""Preference pairs for DPO / RPO: offline from JSONL, or online from the policy and a reward.

A pair record is `{question | prompt | input, chosen, rejected}` with optional `reasoning`
("on"/"off") or `system_prompt`, and for RPO either `reward_gap` or `chosen_reward` and
`rejected_reward`. Rows are laid out chosen, rejected, chosen, rejected, ...; `response_mask`
marks each response's tokens (and the `<|eot_id|>` closing it) and `weights` give every pair a
total weight of 1, so the train step's weighted mean is a mean over pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nemotron_jax.data.batch import PairBatch
from nemotron_jax.rl.rollout import Prompt, Rollout, bucket
from nemotron_jax.tokenizer import Tokenizer


def _messages(record: dict[str, Any]) -> tuple[list[dict[str, str]], bool | None]:
    prompt = record.get("question", record.get("prompt", record.get("input")))
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = [dict(m) for m in prompt]
    else:
        raise ValueError("a preference pair needs 'question', 'prompt' or 'input'")
    system = record.get("system_prompt")
    if system:
        return [{"role": "system", "content": str(system)}, *messages], None
    mode = record.get("reasoning")
    return messages, None if mode is None else mode == "on"


def check_pair(record: dict[str, Any]) -> None:
    _messages(record)
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"missing or empty {key!r} response")


def _gap(record: dict[str, Any]) -> float:
    if "reward_gap" in record:
        return float(record["reward_gap"])
    if "chosen_reward" in record and "rejected_reward" in record:
        return float(record["chosen_reward"]) - float(record["rejected_reward"])
    return 0.0


def encode_pair(tokenizer: Tokenizer, record: dict[str, Any]) -> tuple[list[tuple[list[int], list[bool]]], float]:
    """Token ids and response masks of (chosen, rejected), and the reward gap (0 when unknown)."""
    messages, thinking = _messages(record)
    out = [tokenizer.encode_chat([*messages, {"role": "assistant", "content": record[key]}], thinking=thinking)
           for key in ("chosen", "rejected")]
    return out, _gap(record)


def pair_batch(encoded: Sequence[tuple[list[tuple[list[int], list[bool]]], float]],
               seq_len: int | None = None) -> PairBatch:
    """Interleaved chosen/rejected rows, truncated or padded to `seq_len` (default: a bucket of the longest)."""
    rows = [seq for pair, _ in encoded for seq in pair]
    t = seq_len or bucket(max(len(ids) for ids, _ in rows) - 1)
    batch = PairBatch.zeros(len(rows), t)
    for i, (ids, mask) in enumerate(rows):
        ids, mask = np.asarray(ids[: t + 1], np.int32), np.asarray(mask[: t + 1], bool)
        n = len(ids) - 1
        batch.inputs[i, :n], batch.targets[i, :n] = ids[:-1], ids[1:]
        batch.positions[i, :n], batch.segment_ids[i, :n] = np.arange(n), 1
        batch.response_mask[i, :n] = mask[1:]
        count = max(float(mask[1:].sum()), 1.0)
        batch.weights[i, :n] = mask[1:] / (2.0 * count)
        batch.reward_gap[i, :] = encoded[i // 2][1]
    return batch


def online_pairs(r: Rollout) -> list[dict[str, Any]]:
    """Best-vs-worst response of each prompt's group (groups whose rewards tie give no pair)."""
    pairs = []
    group = r.rewards.shape[1]
    for p, prompt in enumerate(r.prompts):
        rewards = r.rewards[p]
        best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
        if rewards[best] == rewards[worst]:
            continue
        pairs.append(_pair(prompt, r.texts[p * group + best], r.texts[p * group + worst],
                           float(rewards[best] - rewards[worst])))
    return pairs


def _pair(prompt: Prompt, chosen: str, rejected: str, gap: float) -> dict[str, Any]:
    return {"question": prompt.question, "reasoning": "on" if prompt.thinking else "off", "chosen": chosen,
            "rejected": rejected, "reward_gap": gap}
