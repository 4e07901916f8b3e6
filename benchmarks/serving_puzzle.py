"""The pipeline's Puzzle child vs its parent, serving through the engine: the report's speed column.

The tiny pipeline's parent (`tiny-llama`: 4 x `gqa2 swiglu256`) and the child its Puzzle search
chose (`gqa2, gqa2, gqa1, none` attention, the same FFNs; docs/pipeline.md), with random weights
(speed does not depend on them: greedy, exactly `new` tokens per request), each serving the same
concurrent workload through `Model.generate` (`eval/throughput.py`, paired rounds), at several
loads: where the KV reads of many long requests dominate, the child's 320 vs 512 KV bytes per
token and its missing attention layer show; with one short request, fixed overhead dominates.

    .venv/bin/python benchmarks/serving_puzzle.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import subprocess

import jax

import nemotron_jax as nj
from nemotron_jax.eval.throughput import engine_throughput

WORKLOADS = [(1, 32, 32), (8, 128, 32), (32, 192, 32), (64, 448, 32)]  # requests, prompt tokens, new tokens


def child_of(parent: nj.ModelConfig) -> nj.ModelConfig:
    kv = [2, 2, 1, None]
    blocks = [nj.BlockConfig(nj.AttentionConfig("none") if k is None else nj.AttentionConfig("gqa", num_kv_heads=k),
                             b.ffn) for k, b in zip(kv, parent.blocks, strict=True)]
    return parent.replace(blocks=tuple(blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    parent_cfg = nj.preset("tiny-llama")
    models = {"parent": nj.init(parent_cfg, seed=0), "child": nj.init(child_of(parent_cfg), seed=0)}
    rows = []
    for requests, prompt, new in WORKLOADS:
        out = engine_throughput(models, requests=requests, prompt_tokens=prompt, new_tokens=new, rounds=args.rounds)
        rows.append((requests, prompt, new, out["parent"]["engine_tokens_per_s"], out["child"]["engine_tokens_per_s"],
                     out["child"]["engine_speedup"]))
    after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\ntiny-llama parent vs Puzzle child, float32, greedy, jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}; before: {before}; after: {after}\n")
    print("| requests | prompt tokens | new tokens | parent tok/s | child tok/s | child speed-up (paired median) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.2f}x |")


if __name__ == "__main__":
    main()
