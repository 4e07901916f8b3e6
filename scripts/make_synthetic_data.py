#!/usr/bin/env python
"""Write a small synthetic data set as JSON lines (what the tiny recipes generate on the fly).

    python scripts/make_synthetic_data.py gsm8k data/synthetic-gsm8k.jsonl --n 512 --seed 0
    python scripts/make_synthetic_data.py text  data/synthetic-text.jsonl  --n 2048

`gsm8k`: GSM8K-shaped {question, answer, reasoning} word problems, reasoning alternating on/off
(thinking-on examples train `<think>worked solution</think>The answer is N.`, off ones just the
answer). `text`: short templated sentences with counting and arithmetic.
"""

from __future__ import annotations

import argparse

from nemotron_jax.data.synthetic import GENERATORS, write_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=sorted(GENERATORS))
    p.add_argument("output")
    p.add_argument("--n", type=int, default=512, help="number of records")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    path = write_jsonl(args.output, GENERATORS[args.kind](args.n, args.seed))
    print(f"wrote {args.n} {args.kind} records to {path}")


if __name__ == "__main__":
    main()
