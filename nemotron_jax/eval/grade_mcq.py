"""Multiple choice (GPQA-Diamond, MMLU-style): a letter, from `\\boxed{}` first, then the usual
phrasings ("Answer: C", "the answer is (C)", "**Answer:** C", "Option C is correct", a bare "C").

Records are `{"question", "choices": [...], "answer": "C" | 2}`; GPQA's raw CSV/Parquet columns
(`Question`, `Correct Answer`, `Incorrect Answer 1..3`) are read too. GPQA's raw data lists the
right answer first, so `shuffle_seed` permutes the choices per question (seeded by the seed and the
question text, so the prompt and the grader always agree on the order).
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from typing import Any

from nemotron_jax import rewards
from nemotron_jax.eval.grading import Benchmark

LETTERS = string.ascii_uppercase
PROMPT = ("Answer the following multiple choice question. The last line of your response should be of the "
          "following format: 'Answer: \\boxed{{LETTER}}' (without quotes) where LETTER is one of {letters}. "
          "Think step by step before answering.\n\n{question}\n\n{options}")

_L = r"\(?\*{0,2}((?-i:[A-Z]))\*{0,2}\)?"  # an upper-case letter, maybe bold or in parentheses
_END = r"(?=$|[\s.,;:!)\]*])"
_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"answer\s*(?:is|:|-)?\s*(?:option|choice)?\s*:?\s*\**\s*" + _L + _END,
    r"(?:correct|best|right|final)\s+(?:answer|option|choice)\s*(?:is|:|would be|should be)?\s*:?\s*\**\s*"
    r"(?:option|choice)?\s*" + _L + _END,
    r"(?:option|choice)\s+" + _L + r"\s+(?:is|would be|seems)\s+(?:the\s+)?(?:correct|right|best)",
    r"(?<![A-Za-z])" + _L + r"\s+is\s+(?:the\s+)?(?:correct|right|best)\s+(?:answer|option|choice)",
)]
_BOXED_LETTER = re.compile(r"^\s*(?:\\text(?:bf)?\{)?\s*\(?([A-Z])\)?\s*\}?\s*(?:[.:)]|$|\s)", re.IGNORECASE)
_BARE = re.compile(r"^\s*\(?\**([A-Z])\**\)?\s*[.)]?\s*$")  # the whole answer is one letter


def _raw_gpqa(record: dict[str, Any]) -> bool:
    return "Correct Answer" in record and "Question" in record


class MultipleChoice(Benchmark):
    """Letters A, B, C, … for `choices` in order (after the optional seeded shuffle)."""

    name = "mcq"
    template = PROMPT

    def __init__(self, template: str | None = None, system: str | None = None, shuffle_seed: int | None = None):
        super().__init__(template, system)
        self.shuffle_seed = shuffle_seed

    # ------------------------------------------------------------------ schema
    def check(self, record: dict[str, Any]) -> None:
        if _raw_gpqa(record):
            for key in ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"):
                if key not in record:
                    raise ValueError(f"GPQA record has no {key!r} key")
            return
        for key in ("question", "choices", "answer"):
            if key not in record:
                raise ValueError(f"mcq record has no {key!r} key (has {sorted(record)})")
        choices = record["choices"]
        if not isinstance(choices, list | tuple) or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"mcq record key 'choices' must be a list of 2 to 26 options, got {choices!r:.80}")
        self._correct_index(record)

    def _correct_index(self, record: dict[str, Any]) -> int:
        answer, n = record["answer"], len(record["choices"])
        if isinstance(answer, bool):
            raise ValueError("mcq record key 'answer' must be a letter or an index, got a boolean")
        if isinstance(answer, int):
            index = answer
        elif isinstance(answer, str) and re.fullmatch(r"\s*\(?[A-Za-z]\)?\s*", answer):
            index = LETTERS.index(answer.strip(" ()").upper())
        elif isinstance(answer, str) and answer.strip().isdigit():
            index = int(answer)
        else:
            raise ValueError(f"mcq record key 'answer' must be a letter or an index, got {answer!r}")
        if not 0 <= index < n:
            raise ValueError(f"mcq record key 'answer' {answer!r} is out of range for {n} choices")
        return index

    def options(self, record: dict[str, Any]) -> tuple[list[str], int]:
        """(the choices in the order shown, the index of the right one)."""
        if _raw_gpqa(record):
            record = {"question": record["Question"], "answer": 0,
                      "choices": [record["Correct Answer"]] + [record[f"Incorrect Answer {i}"] for i in (1, 2, 3)]}
        choices, right = [str(c).strip() for c in record["choices"]], self._correct_index(record)
        if self.shuffle_seed is None:
            return choices, right
        digest = hashlib.sha256(f"{self.shuffle_seed}:{self._question(record)}".encode()).digest()
        order = list(range(len(choices)))
        random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
        return [choices[i] for i in order], order.index(right)

    @staticmethod
    def _question(record: dict[str, Any]) -> str:
        return str(record["Question"] if _raw_gpqa(record) else record["question"]).strip()

    def fields(self, record: dict[str, Any]) -> dict[str, Any]:
        choices, _ = self.options(record)
        letters = LETTERS[:len(choices)]
        return {**record, "question": self._question(record), "letters": ", ".join(letters),
                "options": "\n".join(f"{letter}) {c}" for letter, c in zip(letters, choices, strict=True))}

    def reference(self, record: dict[str, Any]) -> str:
        return LETTERS[self.options(record)[1]]

    # ------------------------------------------------------------------ grading
    def extract(self, text: str, record: dict[str, Any]) -> str | None:
        n = len(self.options(record)[0])
        valid = lambda letter: letter is not None and letter.upper() in LETTERS[:n]
        boxed = rewards._last_boxed(text)
        if boxed is not None:
            m = _BOXED_LETTER.match(boxed)
            if m and valid(m.group(1)):
                return m.group(1).upper()
        best: tuple[int, str] | None = None
        for pattern in _PATTERNS:
            for m in pattern.finditer(text):
                if valid(m.group(1)) and (best is None or m.start() > best[0]):
                    best = (m.start(), m.group(1))
        if best is not None:
            return best[1]
        m = _BARE.match(text)
        return m.group(1).upper() if m and valid(m.group(1)) else None

    def judge(self, answer: str, record: dict[str, Any]) -> float:
        return float(answer == self.reference(record))

    def vote_key(self, answer: str | None, record: dict[str, Any]) -> str | None:
        return answer
