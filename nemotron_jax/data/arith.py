"""A verifiable reasoning task small models can learn on a CPU: multi-digit addition.

Each record is GSM8K-shaped, `{question, answer, reasoning}`, the answer a worked solution that
adds digit by digit with carries and ends `#### N`. Reasoning-on training renders it as
`<think>worked solution</think>The answer is N.`, reasoning-off as the bare `The answer is N.`, so
a model can only use the worked steps when it thinks: the paper's toggle in miniature.
"""

from __future__ import annotations

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


def arith_records(n: int, seed: int = 0, digits: int = 2) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    lo, hi = 10 ** (digits - 1), 10**digits
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(lo, hi, size=2))
        out.append({"question": f"What is {a} + {b}?", "answer": f"{worked_sum(a, b)}\n#### {a + b}",
                    "reasoning": "on" if i % 2 == 0 else "off"})
    return out


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
