"""MATH-500 / AIME: a LaTeX answer in `\\boxed{}`, graded by Hugging Face `math-verify`.

math-verify parses both sides to SymPy and compares them (`\\frac12` = `\\dfrac{1}{2}` = `0.5`,
`\\sqrt{2}/2` = `\\frac{\\sqrt{2}}{2}`, intervals, sets, matrices, units stripped). It bounds each
parse and comparison with `signal.alarm`, which only works in a process's main thread, so every
answer is verified in a worker process (a fresh interpreter, never a fork of one running JAX) with
an outer per-answer timeout too: a worker that hangs anyway is killed and the answer scores 0.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from nemotron_jax import rewards
from nemotron_jax.eval.grading import Benchmark, Grade, answer_region

BOXED_PROMPT = ("Solve the following math problem. Make sure to put the answer (and only answer) inside "
                "\\boxed{{}}.\n\n{problem}")


def verify_answer(reference: str, answer: str, is_boxed: bool, timeout_s: int = 5) -> tuple[bool, str | None]:
    """(equal, what was parsed from the answer); runs math-verify in the calling process."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"\\boxed{{{reference}}}", configs, parsing_timeout=timeout_s)
    if not gold:
        gold = parse(reference, configs, parsing_timeout=timeout_s)
    pred = parse(f"\\boxed{{{answer}}}" if is_boxed else answer, configs, parsing_timeout=timeout_s)
    if not gold or not pred:
        return False, None
    return bool(verify(gold, pred, timeout_seconds=timeout_s)), str(pred[-1])


class _Worker:
    """One verifier process (`python -m nemotron_jax.eval.grade_math`): a JSON line in, one out."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "nemotron_jax.eval.grade_math"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.ready = False  # has answered once: its imports are done

    def send(self, item: tuple[str, str, bool]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(item) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _Pool:
    """Verifier processes started on first use and replaced when one hangs or dies. Plain
    subprocesses rather than multiprocessing: no re-import of the caller's main script, no fork."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        atexit.register(self.close)

    def get(self, n: int) -> list[_Worker]:
        self.workers = [w for w in self.workers if w.proc.poll() is None]
        self.workers += [_Worker() for _ in range(n - len(self.workers))]
        return self.workers[:n]

    def replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []


_POOL = _Pool()


def verify_many(items: Sequence[tuple[str, str, bool]], timeout_s: float = 20.0,
                workers: int | None = None) -> list[tuple[bool, str | None]]:
    """`verify_answer` over (reference, answer, is_boxed) items in the worker processes; an answer
    whose verification fails or takes longer than `timeout_s` (worker killed) counts as wrong. The
    first call pays for starting the workers (a few seconds; their clock starts after)."""
    out: list[tuple[bool, str | None]] = [(False, None)] * len(items)
    if not items:
        return out
    pending = collections.deque(enumerate(items))
    idle = _POOL.get(workers or max(1, min(4, os.cpu_count() or 1, len(items))))
    busy: dict[_Worker, tuple[int, float]] = {}
    while pending or busy:
        while pending and idle:
            worker, (i, item) = idle.pop(), pending.popleft()
            try:
                worker.send(item)
            except OSError:
                idle.append(_POOL.replace(worker))
                continue
            busy[worker] = (i, time.monotonic() + timeout_s + (0 if worker.ready else _STARTUP_S))
        streams = {w.proc.stdout: w for w in busy}
        wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
        ready, _, _ = select.select(list(streams), [], [], wait)
        for stream in ready:
            worker = streams[stream]
            i, _ = busy.pop(worker)
            line = stream.readline()
            try:
                equal, parsed = json.loads(line)
                out[i] = (bool(equal), parsed)
                worker.ready = True
            except (ValueError, TypeError):  # the worker died (e.g. out of memory)
                worker = _POOL.replace(worker)
            idle.append(worker)
        now = time.monotonic()
        for worker, (_, deadline) in list(busy.items()):
            if now >= deadline:
                busy.pop(worker)
                idle.append(_POOL.replace(worker))
    return out


_STARTUP_S = 60.0  # a fresh worker's import time, not charged to the first answer's timeout


def _serve() -> None:
    """The worker loop: math-verify runs in this process's main thread, so its alarms work."""
    for line in sys.stdin:
        try:
            result = verify_answer(*json.loads(line))
        except Exception:  # any verifier failure is a wrong answer, not a dead worker
            result = (False, None)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class Math(Benchmark):
    """`{"problem", "answer"}` with a LaTeX answer (MATH-500, AIME; `question` is read too)."""

    name = "math"
    template = BOXED_PROMPT
    keys = ("answer",)

    def __init__(self, template: str | None = None, system: str | None = None, timeout_s: float = 20.0):
        super().__init__(template, system)
        self.timeout_s = timeout_s

    def check(self, record: dict[str, Any]) -> None:
        super().check(record)
        if "problem" not in record and "question" not in record:
            raise ValueError(f"math record has no 'problem' key (has {sorted(record)})")

    def fields(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "problem": record.get("problem", record.get("question"))}

    def reference(self, record: dict[str, Any]) -> str:
        return str(record["answer"]).strip()

    def extract(self, text: str, record: dict[str, Any]) -> str | None:
        boxed = rewards._last_boxed(text)
        return boxed.strip() if boxed is not None else None

    def grade_many(self, responses: Sequence[str], records: Sequence[dict[str, Any]], thinking: bool) -> list[Grade]:
        regions = [answer_region(r, thinking) for r in responses]
        boxed = [None if t is None else self.extract(t, rec) for t, rec in zip(regions, records, strict=True)]
        todo = [i for i, t in enumerate(regions) if t is not None and t.strip()]
        items = [(self.reference(records[i]), boxed[i] if boxed[i] is not None else regions[i], boxed[i] is not None)
                 for i in todo]
        verdicts = dict(zip(todo, verify_many(items, self.timeout_s), strict=True))
        out = []
        for i, response in enumerate(responses):
            formatted = bool(rewards.format(response, thinking))
            if regions[i] is None:
                out.append(Grade(None, 0.0, formatted, True))
                continue
            equal, parsed = verdicts.get(i, (False, None))
            answer = boxed[i] if boxed[i] is not None else parsed
            out.append(Grade(answer, float(equal), formatted, False, {"boxed": boxed[i] is not None}))
        return out


if __name__ == "__main__":
    _serve()
