"""Rewards for reasoning RL and evaluation: answer accuracy and the think-tag format.

Both honour the reasoning toggle: with thinking on, the final answer is what follows `</think>`
and the response must open with one well-formed `<think>…</think>`; with thinking off, no think
tags may appear at all. `score_all` runs any reward functions (the user's too) on host with a
per-sample timeout, so one bad sample scores 0 instead of killing a run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# ASCII digits only: Unicode `\d` (and `float`) accept e.g. Devanagari digits, which a random model emits.
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?(?:/[0-9]+)?|-?\.[0-9]+")
_ASCII_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?(?:/[-+]?[0-9]+)?")


def final_answer_text(response: str, thinking: bool) -> str | None:
    """The part of a response that holds the answer (after `</think>` when thinking), or None."""
    if not thinking:
        return response
    if THINK_CLOSE not in response:
        return None
    return response.rsplit(THINK_CLOSE, 1)[1]


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: last `\\boxed{}`, else after `####`, else "the answer is", else last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    match = list(re.finditer(r"answer is[:\s]*\$?([^\n]+)", text, flags=re.IGNORECASE))
    if match:
        return match[-1].group(1).strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def ground_truth(answer: str) -> str:
    """The reference answer: a GSM8K answer field's `#### N` line, a `\\boxed{}`, or the string itself."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(answer)
    return (boxed if boxed is not None else answer).strip()


def answers_equal(predicted: str, reference: str) -> bool:
    """Numerically equal (commas, $, %, trailing zeros, fractions normalised), else equal as text."""
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return _normalise_text(predicted) == _normalise_text(reference)


def accuracy(response: str, answer: str, thinking: bool) -> float:
    """1.0 when the response's final answer equals the ground truth, else 0.0."""
    text = final_answer_text(response, thinking)
    if text is None:
        return 0.0
    predicted = extract_answer(text)
    return float(predicted is not None and answers_equal(predicted, ground_truth(answer)))


def format(response: str, thinking: bool) -> float:  # shadows the builtin: the stable public name
    """1.0 when think tags are exactly as the mode requires, else 0.0.

    On: the response starts with `<think>`, has exactly one `<think>` and one `</think>` in that
    order, and a non-empty answer after it. Off: neither tag appears anywhere.
    """
    if not thinking:
        return float(THINK_OPEN not in response and THINK_CLOSE not in response)
    body = response.lstrip()
    if not body.startswith(THINK_OPEN) or body.count(THINK_OPEN) != 1 or body.count(THINK_CLOSE) != 1:
        return 0.0
    return float(bool(body.split(THINK_CLOSE, 1)[1].strip()))


# ---------------------------------------------------------------- running reward functions safely

RewardFn = Callable[..., float]  # fn(response=..., answer=..., thinking=..., prompt=..., example=...)


def load_reward(spec: str) -> RewardFn:
    """A user reward function named `package.module:function` (importable from the working directory)."""
    import importlib
    import sys

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected 'module:function', e.g. my_rewards:verifier")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr} is not callable")
    return fn


@dataclasses.dataclass(frozen=True)
class RewardResult:
    scores: list[float]
    errors: list[str | None]  # per sample: None, or why it scored 0


def score_all(fn: RewardFn, samples: Sequence[dict[str, Any]], timeout_s: float = 10.0,
              workers: int = 8) -> RewardResult:
    """Apply `fn(**sample)` to every sample in threads; a raise or a timeout scores 0 with a reason.

    A hung user function cannot be killed from Python, so its thread is abandoned (daemon) and the
    run goes on; its result, if it ever comes, is ignored.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
    futures = [pool.submit(fn, **sample) for sample in samples]
    scores: list[float] = []
    errors: list[str | None] = []
    for future in futures:
        try:
            value = float(future.result(timeout=timeout_s))
            if not math.isfinite(value):
                raise ValueError(f"non-finite reward {value}")
            scores.append(value)
            errors.append(None)
        except concurrent.futures.TimeoutError:
            scores.append(0.0)
            errors.append(f"timed out after {timeout_s:g}s")
        except Exception as e:  # any user error scores 0, reported per sample
            scores.append(0.0)
            errors.append(f"{type(e).__name__}: {e}")
    pool.shutdown(wait=False, cancel_futures=True)
    return RewardResult(scores, errors)


# ---------------------------------------------------------------- helpers


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _as_number(text: str) -> float | None:
    t = text.strip().replace(",", "").replace("$", "").replace("%", "").rstrip(".").strip()
    frac = re.fullmatch(r"\\d?frac\{(-?[0-9]+)\}\{(-?[0-9]+)\}", t)
    if frac:
        t = f"{frac.group(1)}/{frac.group(2)}"
    if not _ASCII_NUMBER.fullmatch(t):
        return None
    try:
        return float(Fraction(t)) if "/" in t else float(t)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise_text(text: str) -> str:
    return re.sub(r"\s+", "", text).lower().rstrip(".")
