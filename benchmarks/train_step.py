"""Train-step throughput of a model (~100M parameters by default), against this machine's matmul peak.

Measures (1) the peak: the best of several large float32 `jnp.matmul`s, in FLOP/s; (2) for each
remat option, the jitted `train_step` (LM loss, AdamW) in tokens/s and achieved FLOP/s, with the
compiled step's temporary memory (what remat trades compute for). Model FLOPs per token: 6·N
(N = matmul parameters: blocks and LM head, not the embedding lookup) + 12·L·T·N_heads·head_dim
for dense attention (QKᵀ and PV, forward and backward, full T×T as the XLA reference computes it).
Remat recomputes part of the forward in the backward pass; that extra work is *not* counted, so
it shows as lower achieved FLOP/s: the cost of the memory it saves.

    python benchmarks/train_step.py [--batch 4 --seq 512 --steps 3 --remat none,dots_saveable,full]
                                    [--model tiny-llama] [--update-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.api import init
from nemotron_jax.config import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.presets import resolve_config
from nemotron_jax.train.optim import OptimizerConfig, make_optimizer
from nemotron_jax.train.state import init_state
from nemotron_jax.train.step import make_train_step
from nemotron_jax.train.strategies import LMStrategy

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 12, 768, 12, 4, 2048, 16384


def bench_config() -> ModelConfig:
    block = BlockConfig(AttentionConfig("gqa", KV_HEADS), FFNConfig("swiglu", FFN))
    return ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, blocks=(block,) * LAYERS,
                       rope_theta=10000.0, rope_scaling=None, bos_token_id=1, eos_token_ids=(2,))


def matmul_peak(n: int = 2048, repeats: int = 8) -> float:
    """Best FLOP/s of an n×n×n float32 matmul (the compute ceiling a train step can approach)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return 6.0 * matmul_params + attention


class Variant:
    """One remat option: its compiled step (ahead of time, so compile time and memory are known)
    and its own train state."""

    def __init__(self, cfg: ModelConfig, remat: str, batch: int, seq: int):
        model = init(cfg, seed=0, remat=remat)
        graphdef, params = nnx.split(model.module)
        tx, schedule = make_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
        self.state = init_state(params, tx, 0)
        step = make_train_step(LMStrategy(chunk_tokens=2048), graphdef, tx, schedule)
        rng = np.random.default_rng(0)
        toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
        self.data = jax.device_put(TokenBatch(
            inputs=toks[:, :-1], targets=toks[:, 1:], weights=np.ones((batch, seq), np.float32),
            positions=np.broadcast_to(np.arange(seq), (batch, seq)).astype(np.int32),
            segment_ids=np.ones((batch, seq), np.int32)))
        t = time.perf_counter()
        self.compiled = step.lower(self.state, self.data).compile()
        self.compile_s = time.perf_counter() - t
        memory = self.compiled.memory_analysis()
        self.temp_bytes = float(getattr(memory, "temp_size_in_bytes", float("nan")))
        self.times: list[float] = []
        self.step()  # warm-up

    def step(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.data, None)
        jax.block_until_ready(metrics)
        self.loss = float(metrics["loss"])
        return time.perf_counter() - t


def run(cfg: ModelConfig, remats: list[str], batch: int, seq: int, rounds: int, peak_n: int
        ) -> tuple[float, dict[str, dict[str, float]]]:
    """Round-robin timing: each round measures the matmul peak and one step of every variant, so
    load from other processes on a shared machine affects them all alike; best times are kept."""
    variants = {r: Variant(cfg, r, batch, seq) for r in remats}
    peak = 0.0
    for _ in range(rounds):
        peak = max(peak, matmul_peak(peak_n, repeats=3))
        for v in variants.values():
            v.times.append(v.step())
    tokens = batch * seq
    rows = {}
    for remat, v in variants.items():
        step_s = min(v.times)
        rows[remat] = {"compile_s": v.compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
                       "flops_per_s": model_flops_per_token(cfg, seq) * tokens / step_s,
                       "temp_gib": v.temp_bytes / 2**30, "loss": v.loss}
    return peak, rows


def table(cfg: ModelConfig, args: argparse.Namespace, peak: float, rows: dict[str, dict[str, float]]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "## Train step",
        "",
        f"Command: `python benchmarks/train_step.py --batch {args.batch} --seq {args.seq} --steps {args.steps} "
        f"--remat {args.remat}" + (f" --model {args.model}`" if args.model else "`"),
        "",
        f"Machine: {jax.devices()[0].platform.upper()} ({cpu}, {os.cpu_count()} cores visible, shared with other "
        f"jobs while measured), JAX {jax.__version__}. Model: {args.model or 'built-in'}, {cfg.num_layers} layers "
        f"({', '.join(sorted({f'{b.attention} {b.ffn}' for b in cfg.blocks}))}), hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}: {cfg.num_params() / 1e6:.2f}M parameters, "
        f"float32, batch {args.batch} x {args.seq} tokens, AdamW. "
        f"Measured matmul peak ({args.peak_n}³ float32, best over the run): {peak / 1e9:.1f} GFLOP/s. Timing is "
        f"round-robin ({args.steps} rounds, each: the matmul peak, then one step of every remat option) and the "
        "best step of each option is kept, so background load on the shared machine affects all rows alike.",
        "",
        "| remat | step (s) | tokens/s | model GFLOP/s | % of matmul peak | step temp memory (GiB) | compile (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for remat, r in rows.items():
        lines.append(f"| {remat} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['flops_per_s'] / 1e9:.1f} | "
                     f"{100 * r['flops_per_s'] / peak:.0f}% | {r['temp_gib']:.2f} | {r['compile_s']:.0f} |")
    lines += ["", "Model FLOPs = 6·N·tokens + dense attention (see the script's docstring); recomputation by "
              "remat is not counted, so its cost appears as a lower percentage."]
    return "\n".join(lines) + "\n"


def update_docs(path: Path, section: str) -> None:
    """Replace (or append) only the `## Train step` section of `path`."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Train step\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--remat", default="none,dots_saveable,full")
    p.add_argument("--peak-n", type=int, default=2048)
    p.add_argument("--model", default=None, help="a preset (e.g. tiny-llama), an HF or saved model directory; "
                   "default: the built-in ~100M model")
    p.add_argument("--update-docs", type=Path, default=None)
    args = p.parse_args()
    cfg = bench_config() if args.model is None else resolve_config(args.model)
    print(f"model: {cfg.num_params() / 1e6:.1f}M params", file=sys.stderr)
    peak, rows = run(cfg, args.remat.split(","), args.batch, args.seq, args.steps, args.peak_n)
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; {rows}", file=sys.stderr)
    section = table(cfg, args, peak, rows)
    print(section)
    if args.update_docs:
        update_docs(args.update_docs, section)


if __name__ == "__main__":
    main()
