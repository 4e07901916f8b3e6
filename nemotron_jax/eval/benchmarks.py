"""Benchmarks as data plus a grader each: the prompt a record becomes, and how a response scores.

One object per benchmark, shared by evaluation and RL rewards so the two can never disagree:

    bench = benchmarks.get("math")                 # gsm8k | math | mcq | ifeval | code
    messages = bench.messages(record)              # the user turn(s), before the reasoning toggle
    score = bench.score(response, record, thinking=True)   # float in [0, 1]

Only the text after `</think>` is graded when thinking is on; a thought that never closes is no
answer (`Grade.truncated`). Records are read in each benchmark's own schema (`bench.check`
names the missing or malformed key); `grade_many` grades a batch at once so the graders that need
a process pool (math-verify) or subprocesses (code) run them in parallel.
"""

from __future__ import annotations

from typing import Any

from nemotron_jax.eval.grade_code import Code
from nemotron_jax.eval.grade_ifeval import IFEval
from nemotron_jax.eval.grade_math import Math
from nemotron_jax.eval.grade_mcq import MultipleChoice
from nemotron_jax.eval.grade_numeric import GSM8K
from nemotron_jax.eval.grading import Benchmark, Grade, Message, Record, answer_region

__all__ = ["NAMES", "Benchmark", "Grade", "Message", "Record", "answer_region", "get"]

REGISTRY: dict[str, type[Benchmark]] = {"gsm8k": GSM8K, "math": Math, "mcq": MultipleChoice, "ifeval": IFEval,
                                        "code": Code}
NAMES = tuple(REGISTRY)


def get(name: str, **options: Any) -> Benchmark:
    """The benchmark called `name` (gsm8k, math, mcq, ifeval, code); `options` go to its
    constructor (e.g. `template=`, `system=`, mcq's `shuffle_seed=`, code's `timeout_s=`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(NAMES)}")
    return REGISTRY[name](**options)
