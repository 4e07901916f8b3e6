"""GSM8K: a number as the answer (`#### N` in the reference, or the number itself), graded by
numeric equivalence with ASCII-only number parsing (see `nemotron_jax.rewards`)."""

from __future__ import annotations

from typing import Any

from nemotron_jax import rewards
from nemotron_jax.eval.grading import Benchmark

BOXED_PROMPT = ("Solve the following math problem. Make sure to put the answer (and only answer) inside "
                "\\boxed{{}}.\n\n{question}")


class GSM8K(Benchmark):
    """`{"question", "answer"}`; the answer field ends in `#### N` (GSM8K) or is the number."""

    name = "gsm8k"
    template = BOXED_PROMPT
    keys = ("question", "answer")

    def reference(self, record: dict[str, Any]) -> str:
        return rewards.ground_truth(str(record["answer"]))

    def extract(self, text: str, record: dict[str, Any]) -> str | None:
        return rewards.extract_answer(text)

    def judge(self, answer: str, record: dict[str, Any]) -> float:
        return float(rewards.answers_equal(answer, self.reference(record)))

    def vote_key(self, answer: str | None, record: dict[str, Any]) -> str | None:
        if answer is None:
            return None
        value = rewards._as_number(answer)
        return f"{value:.9g}" if value is not None else super().vote_key(answer, record)
