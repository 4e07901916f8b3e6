"""The grader interface every benchmark implements: a record's prompt, the graded part of a
response (after `</think>` when thinking), and a `Grade` per response."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from nemotron_jax import rewards

Record = dict[str, Any]
Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Grade:
    """One response graded: the extracted answer (None: none found), its score in [0, 1], whether
    the think tags were as the mode requires, whether the thought never closed, and extras
    (e.g. IFEval's four metrics)."""

    answer: str | None
    score: float
    formatted: bool
    truncated: bool
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def answer_region(response: str, thinking: bool) -> str | None:
    """What is graded: the text after the last `</think>` when thinking, None if the thought never
    closed; the whole response when not thinking."""
    return rewards.final_answer_text(response, thinking)


class Benchmark:
    """A benchmark's prompt template and grader. Subclasses set `name`, `template`, `keys` and
    implement `extract` and `judge` (or override `grade_many`)."""

    name: str = ""
    template: str = "{question}"
    keys: tuple[str, ...] = ()  # required record keys
    votes: bool = True  # whether maj@k means anything (an answer to vote on)

    def __init__(self, template: str | None = None, system: str | None = None):
        if template is not None:
            self.template = template
        self.system = system

    # ------------------------------------------------------------------ records and prompts
    def check(self, record: Record) -> None:
        """Raise ValueError naming the key when `record` is not in this benchmark's schema."""
        for key in self.keys:
            if key not in record:
                raise ValueError(f"{self.name} record has no {key!r} key (has {sorted(record)})")
            if record[key] is None:
                raise ValueError(f"{self.name} record key {key!r} is null")

    def fields(self, record: Record) -> dict[str, Any]:
        """The values the template is formatted with."""
        return dict(record)

    def messages(self, record: Record) -> list[Message]:
        """The user turn for one record (the reasoning toggle and `system` go in the system turn)."""
        self.check(record)
        return [{"role": "user", "content": self.template.format(**self.fields(record))}]

    def reference(self, record: Record) -> str:
        """The reference answer as shown in outputs."""
        return str(record.get("answer", ""))

    # ------------------------------------------------------------------ grading
    def extract(self, text: str, record: Record) -> str | None:
        """The final answer in the graded text, or None."""
        raise NotImplementedError

    def judge(self, answer: str, record: Record) -> float:
        """Score of an extracted answer against the record's reference."""
        raise NotImplementedError

    def vote_key(self, answer: str | None, record: Record) -> str | None:
        """The equivalence class an answer votes for in maj@k (None: no vote)."""
        return None if answer is None else "".join(answer.split()).lower()

    def grade(self, response: str, record: Record, thinking: bool = True) -> Grade:
        return self.grade_many([response], [record], thinking)[0]

    def score(self, response: str, record: Record, thinking: bool = True) -> float:
        """The response's score in [0, 1]: what evaluation reports and an RL reward can use."""
        return self.grade(response, record, thinking).score

    def grade_many(self, responses: Sequence[str], records: Sequence[Record], thinking: bool) -> list[Grade]:
        out = []
        for response, record in zip(responses, records, strict=True):
            region = answer_region(response, thinking)
            formatted = bool(rewards.format(response, thinking))
            if region is None:
                out.append(Grade(None, 0.0, formatted, True))
                continue
            answer = self.extract(region, record)
            score = 0.0 if answer is None else float(self.judge(answer, record))
            out.append(Grade(answer, score, formatted, False))
        return out
