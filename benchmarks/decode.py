"""Decode throughput: nemotron-jax's jitted while-loop sampler vs transformers' `generate`.

For a ~60M and a ~300M parameter Llama-shaped model (vocab 32000, float32 weights and cache,
greedy, every row generating exactly `--new` tokens after a `--prompt-len`-token prompt), it times
both implementations on the same weights, batch and lengths in one run, and checks they produce
the same tokens. At batch 1 it compares our decode speed with the memory-bandwidth roofline:
every decode step must read all weights except the embedding table (one row of it) plus the KV
cache, so tokens/s <= measured read bandwidth / those bytes; bandwidth is measured here with a
large reduction. Finally the same model with every other layer's attention removed (Puzzle's
no-op attention) shows what removing attention buys: speed-up vs bytes and FLOPs saved per token.

    .venv/bin/python benchmarks/decode.py [--sizes 60m,300m] [--batches 1,8] [--new 128]

Prints a markdown table (the one in docs/benchmarks.md, section "Decode throughput").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import nemotron_jax as nj
from nemotron_jax.sampling import stream

VOCAB = 32000
SIZES = {  # hidden, heads, kv heads, layers, FFN width
    "60m": (512, 8, 4, 8, 1536),
    "300m": (1024, 16, 8, 20, 2816),
}


def config(size: str, drop_half_attention: bool = False) -> nj.ModelConfig:
    hidden, heads, kv, layers, ffn = SIZES[size]
    blocks = []
    for i in range(layers):
        attention = nj.AttentionConfig("none") if drop_half_attention and i % 2 else nj.AttentionConfig("gqa", kv)
        blocks.append(nj.BlockConfig(attention, nj.FFNConfig("swiglu", ffn)))
    return nj.ModelConfig(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, blocks=tuple(blocks),
                          max_position_embeddings=16384, bos_token_id=1, eos_token_ids=(2,), torch_dtype="float32")


def bytes_per_token(cfg: nj.ModelConfig, context: int, dtype_bytes: int = 4) -> int:
    """Bytes a batch-1 decode step must read: weights (embedding: one row) and the KV cache so far."""
    weights = cfg.num_params() - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    return weights * dtype_bytes + cfg.kv_cache_bytes_per_token("float32") * context


def flops_per_token(cfg: nj.ModelConfig, context: int) -> int:
    """Multiply-adds x 2 of one decode step: every weight once, plus attention over the context."""
    gqa = sum(b.attention.kind == "gqa" for b in cfg.blocks)
    weights = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    return 2 * weights + 4 * gqa * cfg.num_attention_heads * cfg.head_dim * context


def read_bandwidth() -> float:
    """Bytes/s of the fastest of a numpy and a jitted JAX sum over a 1 GiB float32 array."""
    x = np.random.default_rng(0).random(2**28, dtype=np.float32)
    xj = jnp.asarray(x)
    jsum = jax.jit(jnp.sum)
    jsum(xj).block_until_ready()
    best = float("inf")
    for _ in range(5):
        for f in (lambda: x.sum(), lambda: jsum(xj).block_until_ready()):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def time_ours(model: nj.Model, prompts: list[list[int]], new: int, repeats: int) -> tuple[float, float, list]:
    """(end-to-end seconds, decode-loop seconds, tokens); best of `repeats` after a compiling run."""
    graphdef, state = model.split()
    best_total = best_decode = float("inf")
    tokens = None
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        it = stream(graphdef, state, prompts, new, stop_tokens=[])
        st = next(it)
        jax.block_until_ready(st.tokens_BxS)
        t1 = time.perf_counter()
        for st in it:
            jax.block_until_ready(st.tokens_BxS)
        t2 = time.perf_counter()
        if r:
            best_total, best_decode = min(best_total, t2 - t0), min(best_decode, t2 - t1)
        tokens = np.asarray(st.tokens_BxS)[:len(prompts), :new]
    return best_total, best_decode, tokens.tolist()


def time_hf(hf, prompts: list[list[int]], new: int, repeats: int) -> tuple[float, list]:
    import torch

    ids = torch.tensor(prompts)
    best, out = float("inf"), None
    for r in range(repeats + 1):
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        if r:
            best = min(best, time.perf_counter() - t)
    return best, out[:, ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="60m,300m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    bandwidth = read_bandwidth()
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    rows, notes = [], []
    for size in args.sizes.split(","):
        cfg = config(size)
        model = nj.init(cfg, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_hf(tmp, format="llama")
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        pruned = nj.init(config(size, drop_half_attention=True), seed=0)
        context = args.prompt_len + args.new // 2
        for batch in batches:
            prompts = rng.integers(3, VOCAB, size=(batch, args.prompt_len)).tolist()
            total, decode, ours = time_ours(model, prompts, args.new, args.repeats)
            hf_total, theirs = time_hf(hf, prompts, args.new, args.repeats)
            _, p_decode, _ = time_ours(pruned, prompts, args.new, args.repeats)
            same = np.mean(np.asarray(ours) == np.asarray(theirs))
            n = batch * args.new
            decode_tps = batch * (args.new - 1) / decode
            roof = bandwidth / bytes_per_token(cfg, context) if batch == 1 else float("nan")
            rows.append((size, f"{cfg.num_params() / 1e6:.0f}M", batch, n / total, decode_tps, n / hf_total,
                         hf_total / total, roof, batch * (args.new - 1) / p_decode,
                         decode / p_decode, same))
            print(f"progress: {rows[-1]}", file=sys.stderr, flush=True)
        saved_b = 1 - bytes_per_token(pruned.config, context) / bytes_per_token(cfg, context)
        saved_f = 1 - flops_per_token(pruned.config, context) / flops_per_token(cfg, context)
        notes.append(f"{size}: half the attention removed saves {saved_b:.1%} of the bytes and {saved_f:.1%} of "
                     f"the FLOPs per decode token at context {context} (KV cache: "
                     f"{pruned.config.kv_cache_bytes_per_token('float32')} vs "
                     f"{cfg.kv_cache_bytes_per_token('float32')} bytes/token)")
        del model, hf, pruned
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.devices()[0]}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}; float32 weights and cache; "
          f"greedy; prompt {args.prompt_len}, {args.new} new tokens per row; best of {args.repeats}; "
          f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| model | params | batch | ours tok/s (end-to-end) | ours decode tok/s | transformers tok/s | "
          "speed-up | batch-1 roofline tok/s | ours / roofline | half-attention decode tok/s | "
          "half-attention speed-up | same tokens as HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, params, b, tps, dtps, hf_tps, speedup, roof, p_tps, p_speed, same in rows:
        ratio = f"{dtps / roof:.2f}" if b == 1 else "–"
        roof_s = f"{roof:.1f}" if b == 1 else "–"
        print(f"| {size} | {params} | {b} | {tps:.1f} | {dtps:.1f} | {hf_tps:.1f} | {speedup:.2f}× | {roof_s} | "
              f"{ratio} | {p_tps:.1f} | {p_speed:.2f}× | {same:.0%} |")
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
