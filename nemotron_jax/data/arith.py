"""Verifiable reasoning tasks small models can learn on a CPU: multi-digit addition and chains.

Each record is GSM8K-shaped, `{question, answer, reasoning}`, the answer a worked solution that
ends `#### N`. Reasoning-on training renders it as `<think>worked solution</think>The answer is N.`,
reasoning-off as the bare `The answer is N.`, so a model can only use the worked steps when it
thinks: the paper's toggle in miniature.

- `arith_records`: a + b with 2-digit operands, added column by column with carries.
- `chain_records`: a + b + c with 1-digit operands, one running sum per line; short enough that
  a tiny model learns the steps in a minute, hard enough that answering without them is a guess
  more often than not.

About one problem in ten is held out (`split="test"`) and never generated for training.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np


def worked_sum(a: int, b: int) -> str:
    """Column addition, least significant digit first, one line per column."""
    lines, carry, da, db = [], 0, str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x} + {y}{f' + {carry}' if carry else ''} = {s}, write {s % 10}"
                     + (", carry 1." if s >= 10 else "."))
        carry = s // 10
    if carry:
        lines.append("write the carry 1.")
    return "\n".join(lines)


def is_held_out(a: int, b: int) -> bool:
    """About one pair in ten is reserved for evaluation and never generated for training.

    A CRC of the pair, not a function of the digits mod 10: a split on the ones digits (as
    `7a + 13b ≡ 0 mod 10` is) holds out every problem whose first column is one of ten digit
    pairs, a step the student never sees, and held-out accuracy would measure that gap instead of
    transfer (it read 0.00 against 0.31 on training problems)."""
    return zlib.crc32(f"{a} {b}".encode()) % 10 == 0


def arith_records(n: int, seed: int = 0, digits: int = 2, split: str = "train",
                  sloppy: float = 0.0) -> list[dict[str, Any]]:
    """`n` problems a + b with `digits`-digit operands, from the training or the held-out pairs.

    `sloppy`: the fraction of reasoning-on records whose final answer reads the written digits
    back in the order they were computed (least significant first: 26 + 56 -> "28") although
    the worked solution is right. An SFT'd student imitates the habit; RL with a verifiable
    reward can drop it and surpass its teacher, as LN-Ultra surpassed its own."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    rng = np.random.default_rng(seed)
    lo, hi = 10 ** (digits - 1), 10**digits
    out: list[dict[str, Any]] = []
    while len(out) < n:
        a, b = (int(x) for x in rng.integers(lo, hi, size=2))
        if is_held_out(a, b) != (split == "test"):
            continue
        thinking = len(out) % 2 == 0
        final = str(a + b)
        if sloppy and thinking and rng.random() < sloppy:
            final = final[::-1].lstrip("0") or "0"
        out.append({"question": f"What is {a} + {b}?", "answer": f"{worked_sum(a, b)}\n#### {final}",
                    "reasoning": "on" if thinking else "off"})
    return out


def sloppy_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The task as taught by a sloppy teacher: half of its reasoning-on answers have the digits reversed."""
    return arith_records(n, seed, sloppy=0.5)


def pair_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs on the same task: the right answer in the right format vs a wrong one."""
    rng = np.random.default_rng(seed)
    out = []
    for r in arith_records(n, seed):
        final = int(r["answer"].rsplit("####", 1)[1])
        solution = r["answer"].rsplit("####", 1)[0].strip()
        wrong = final + int(rng.choice([-11, -10, -1, 1, 10, 11]))
        thinking = r["reasoning"] == "on"
        good = f"<think>{solution}</think>The answer is {final}." if thinking else f"The answer is {final}."
        bad = f"<think>{solution}</think>The answer is {wrong}." if thinking else f"The answer is {wrong}."
        out.append({"question": r["question"], "reasoning": r["reasoning"], "chosen": good, "rejected": bad,
                    "chosen_reward": 2.0, "rejected_reward": 1.0})
    return out


def chain_records(n: int, seed: int = 0, split: str = "train", sloppy: float = 0.0,
                  terms: int = 3) -> list[dict[str, Any]]:
    """`n` problems summing `terms` one-digit numbers; the solution keeps a running sum.

    `sloppy`: the fraction of reasoning-on records whose final answer repeats the first running
    sum instead of the last although every step is right: a teacher habit an SFT'd student
    imitates and RL with a verifiable reward removes (so the student surpasses its teacher, as
    LN-Ultra surpassed its own)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        xs = [int(x) for x in rng.integers(1, 10, size=terms)]
        # A weighted digit sum: for every held-out chain, its steps (a + b, then s + c) also occur
        # in training chains, so the split measures transfer, not unseen steps.
        if (sum(x * w for x, w in zip(xs, (7, 13, 17, 19, 23), strict=False)) % 10 == 0) != (split == "test"):
            continue
        sums = np.cumsum(xs).tolist()
        steps = "\n".join(f"{s} + {x} = {s + x}" for s, x in zip(sums[:-1], xs[1:], strict=True))
        thinking = len(out) % 2 == 0
        final = sums[1] if sloppy and thinking and rng.random() < sloppy else sums[-1]
        out.append({"question": "What is " + " + ".join(map(str, xs)) + "?", "answer": f"{steps}\n#### {final}",
                    "reasoning": "on" if thinking else "off"})
    return out


def sloppy_chain_records(n: int, seed: int = 0, terms: int = 3) -> list[dict[str, Any]]:
    """Chains as taught by a sloppy teacher: 60 % of its reasoning-on answers repeat the first running sum."""
    return chain_records(n, seed, sloppy=0.6, terms=terms)
