"""Small synthetic data sets, so that the tiny recipes and tests run from a clean checkout.

- `text`: short templated English sentences with counting and arithmetic: regular enough that a
  tiny model learns them in a few hundred steps, varied enough that its predictions carry
  information (a useful teacher for KD).
- `gsm8k`: GSM8K-shaped word problems `{question, answer, reasoning}` whose answer is a worked
  solution ending `#### N`, alternating `reasoning` on/off.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from nemotron_jax.data import arith
from nemotron_jax.errors import DataError

_NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "June"]
_THINGS = ["apples", "books", "coins", "pens", "shells", "stamps", "cards", "eggs"]
_COLOURS = ["red", "blue", "green", "small", "old", "new"]
_VERBS = ["finds", "buys", "gets", "picks up", "is given"]


def text_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sentences = []
        for _ in range(int(rng.integers(2, 5))):
            name, thing, colour = rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_COLOURS)
            a, b = (int(x) for x in rng.integers(1, 20, size=2))
            pick = int(rng.integers(0, 3))
            if pick == 0:
                sentences.append(f"{name} has {a} {colour} {thing}. {name} {rng.choice(_VERBS)} {b} more, "
                                 f"so {name} has {a + b} {thing}.")
            elif pick == 1:
                start = int(rng.integers(1, 50))
                sentences.append("Counting: " + " ".join(str(start + i) for i in range(6)) + ".")
            else:
                sentences.append(f"{a} plus {b} is {a + b}, and {a} times {b} is {a * b}.")
        out.append({"text": " ".join(sentences)})
    return out


def gsm8k_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b, c = (int(x) for x in rng.integers(2, 30, size=3))
        if i % 3 == 0:
            question = f"{name} has {a} {thing} and {rng.choice(_VERBS)} {b} more. How many {thing} does {name} have?"
            answer = f"{name} starts with {a} {thing}.\n{name} gets {b} more, so {a}+{b} = <<{a}+{b}={a + b}>>{a + b}."
            final = a + b
        elif i % 3 == 1:
            question = f"{name} buys {a} boxes of {thing} with {b} {thing} in each box. How many {thing} is that?"
            answer = f"Each box holds {b} {thing}.\n{a} boxes hold {a}*{b} = <<{a}*{b}={a * b}>>{a * b} {thing}."
            final = a * b
        else:
            total = a + b + c
            question = (f"{name} had {total} {thing}, gave away {a} and lost {b}. How many {thing} are left?")
            answer = (f"{name} gave away {a}, leaving {total}-{a} = <<{total}-{a}={b + c}>>{b + c}.\n"
                      f"After losing {b}, {b + c}-{b} = <<{b + c}-{b}={c}>>{c} are left.")
            final = c
        out.append({"question": question, "answer": f"{answer}\n#### {final}",
                    "reasoning": "on" if i % 2 == 0 else "off"})
    return out


GENERATORS = {"text": text_records, "gsm8k": gsm8k_records, "arith": arith.arith_records,
              "arith_sloppy": arith.sloppy_records, "chain": arith.chain_records,
              "chain_sloppy": arith.sloppy_chain_records, "chain4": partial(arith.chain_records, terms=4),
              "chain4_sloppy": partial(arith.sloppy_chain_records, terms=4), "pairs": arith.pair_records}


HELD_OUT = ("arith", "chain", "chain4")  # the tasks with a test split
PREFIX = "synthetic:"


def heldout_records(kind: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` problems of task `kind`'s test split: never generated for training."""
    if kind not in HELD_OUT:
        raise DataError(f"synthetic:{kind} has no held-out split; expected one of "
                         + ", ".join(f"synthetic:{k}" for k in HELD_OUT))
    return GENERATORS[kind](n, seed=seed, split="test")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records as JSON lines (to a temp file renamed into place, so a reader never sees half;
    each writer has its own temp file, so the hosts of a multi-host run may all generate the same
    deterministic data into a shared directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    Path(f.name).replace(path)
    return path


def ensure(kind: str, path: str | Path, n: int, seed: int = 0) -> Path:
    """`path`, generating `n` synthetic `kind` records there first if it does not exist yet."""
    if kind not in GENERATORS:
        raise DataError(f"unknown synthetic data kind {kind!r}; expected one of {sorted(GENERATORS)}")
    path = Path(path)
    return path if path.is_file() else write_jsonl(path, GENERATORS[kind](n, seed))


def kind_of(spec: str) -> str | None:
    """The task named by a data spec `synthetic:KIND` (checked), or None for any other spec.

    This is the one place the `synthetic:` prefix is read: every data path in a recipe or on the
    command line may be `synthetic:KIND`, and synthetic data is used only when asked for so."""
    if not spec.startswith(PREFIX):
        return None
    kind = spec[len(PREFIX):]
    if kind not in GENERATORS:
        raise DataError(f"{spec}: unknown synthetic data kind {kind!r}; expected one of "
                        + ", ".join(PREFIX + k for k in sorted(GENERATORS)))
    return kind


def materialize(spec: str, path: str | Path, n: int, seed: int = 0) -> str:
    """The readable data path for `spec`: `synthetic:KIND` generates `n` records at `path` first
    (once; later calls reuse the file); any other spec is returned as it is, to be opened (and
    reported if missing) by `sources.open_source`."""
    kind = kind_of(spec)
    return spec if kind is None else str(ensure(kind, path, n, seed))
