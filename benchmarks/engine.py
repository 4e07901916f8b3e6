"""The engine vs the static sampler vs transformers `generate`, on the same weights, in one run.

57M-parameter Llama (hidden 512, 8 layers, vocab 32000, float32, greedy; `--size 300m` for the larger
one), three workloads:
- uniform decode: batch 1 and 8, 32-token prompts, 128 new tokens; decode tok/s against the
  bandwidth roofline (bytes of weights + KV read per token / bandwidth measured here, with a large
  copy and a large reduction, numpy and JAX; the best counts).
- long-tailed: 64 requests, prompts 16-128 tokens, new tokens lognormal around 48 clipped to
  8-340; useful tokens/s of the engine (all requests at once), the static sampler in batches of 8
  (each batch runs to its longest request) and transformers `generate` in batches of 8 (left-padded);
  KV memory in use at the peak vs a contiguous cache of 32 slots sized for the longest request.
- GRPO-shaped: 16 prompts x 16 samples: prefill tokens and peak KV bytes with vs without sharing.

    .venv/bin/python benchmarks/engine.py [--requests 64] [--skip-hf]

Prints a markdown table with `uptime` (the load matters: numbers on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as dec

import nemotron_jax as nj
from nemotron_jax.engine import SamplingOptions
from nemotron_jax.sampling import generate as static_generate


def bandwidth() -> float:
    """Best of a large copy (bytes read + written) and a large reduction (bytes read), numpy and JAX."""
    x = np.random.default_rng(0).random(2**27, dtype=np.float32)
    xj = jnp.asarray(x)
    jcopy = jax.jit(lambda a: a + 0.0)
    jcopy(xj).block_until_ready()
    best = 0.0
    for _ in range(3):
        for fn, moved in ((lambda: x.copy(), 2), (lambda: jcopy(xj).block_until_ready(), 2)):
            t = time.perf_counter()
            fn()
            best = max(best, moved * x.nbytes / (time.perf_counter() - t))
    return max(best, dec.read_bandwidth())


def timed(fn, repeats: int = 2):
    out, best = None, float("inf")
    for r in range(repeats + 1):
        t = time.perf_counter()
        out = fn()
        if r:
            best = min(best, time.perf_counter() - t)
    return best, out


def uniform(model, hf, bw: float, rows: list) -> None:
    cfg = model.config
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        prompts = rng.integers(3, dec.VOCAB, size=(batch, 32)).tolist()
        eng = nj.Engine(model, max_batch=8, page_size=16, num_pages=8 * 11 + 1, decode_steps=16)
        t_eng, ours = timed(lambda eng=eng, prompts=prompts: eng.generate(prompts, 128, stop_tokens=[]), 3)
        t_static, _, theirs = dec.time_ours(model, prompts, 128, 2)
        t_hf, hf_out = dec.time_hf(hf, prompts, 128, 1) if hf is not None else (float("nan"), None)
        roof = bw / dec.bytes_per_token(cfg, 32 + 64) * batch if batch == 1 else float("nan")
        n = batch * 128
        rows.append(("uniform", f"batch {batch}", n / t_eng, n / t_static, n / t_hf,
                     f"roofline {roof:.0f} tok/s, engine at {n / t_eng / roof:.2f}" if batch == 1 else "",
                     ours == theirs and (hf_out is None or ours == hf_out)))
        print(f"progress: {rows[-1]}", file=sys.stderr, flush=True)


def long_tail(model, hf, requests: int, rows: list) -> None:
    rng = np.random.default_rng(1)
    lens = rng.integers(16, 129, size=requests)
    prompts = [rng.integers(3, dec.VOCAB, size=n).tolist() for n in lens]
    new = np.clip(np.round(rng.lognormal(np.log(48), 0.9, size=requests)), 8, 340).astype(int).tolist()
    useful = sum(new)
    eng = nj.Engine(model, max_batch=32, page_size=16, num_pages=32 * 30 + 1, decode_steps=8)
    eng.generate(prompts, new, stop_tokens=[])  # compile the buckets this workload uses
    t = time.perf_counter()
    ours = eng.generate(prompts, new, stop_tokens=[])
    t_eng = time.perf_counter() - t
    peak = 0  # pages in use at the peak of the same workload, stepped by hand
    for i, (p, n) in enumerate(zip(prompts, new, strict=True)):
        eng.add_request(p, SamplingOptions(n, stop_tokens=()), request_id=("kv", i))
    while eng.has_work():
        eng.step()
        peak = max(peak, eng.num_pages - 1 - eng.free_pages)

    def static_run():
        out = []
        for i in range(0, requests, 8):
            got = static_generate(*model.split(), prompts[i:i + 8], max(new[i:i + 8]), stop_tokens=[]).tokens
            out += [g[:n] for g, n in zip(got, new[i:i + 8], strict=True)]
        return out

    static_run()
    t = time.perf_counter()
    theirs = static_run()
    t_static = time.perf_counter() - t
    t_hf = float("nan")
    if hf is not None:
        import torch

        t = time.perf_counter()
        for i in range(0, requests, 8):
            ps = prompts[i:i + 8]
            width = max(map(len, ps))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
            with torch.inference_mode():
                hf.generate(ids, attention_mask=mask, max_new_tokens=max(new[i:i + 8]),
                            min_new_tokens=max(new[i:i + 8]), do_sample=False, pad_token_id=0)
        t_hf = time.perf_counter() - t
    same = np.mean([a == b for a, b in zip(ours, theirs, strict=True)])
    contiguous = 32 * (max(map(len, prompts)) + max(new))  # 32 slots, each sized for the longest request
    contiguous_bytes = contiguous * model.config.kv_cache_bytes_per_token("float32")
    rows.append(("long-tailed", f"{requests} req, {useful} useful tok", useful / t_eng, useful / t_static,
                 useful / t_hf, f"engine {useful / t_eng / (useful / t_static):.2f}x static, "
                 f"{t_hf / t_eng:.2f}x transformers generate; {eng.stats['decode_calls']} decode calls; "
                 f"KV in use at peak "
                 f"{peak * eng.geometry.page_bytes(16, 'float32') / 2**20:.0f} MiB (32 slots) vs a contiguous "
                 f"32-slot cache {contiguous_bytes / 2**20:.0f} MiB",
                 f"{same:.2f} rows equal static"))
    print(f"progress: {rows[-1]}", file=sys.stderr, flush=True)


def grpo(model, rows: list) -> None:
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, dec.VOCAB, size=int(n)).tolist() for n in rng.integers(48, 129, size=16)]
    out = {}
    for share in (True, False):
        eng = nj.Engine(model, max_batch=32, page_size=16, num_pages=16 * 16 * 11 + 1, decode_steps=8,
                        share_prefixes=share)
        peak = 0
        for i, p in enumerate(prompts):
            for j in range(16):
                eng.add_request(p, SamplingOptions(32, temperature=1.0, seed=0, sample_index=i * 16 + j,
                                                   stop_tokens=()), group=i if share else None)
        t = time.perf_counter()
        while eng.has_work():
            eng.step()
            peak = max(peak, eng.num_pages - 1 - eng.free_pages)
        out[share] = (eng.stats["prefill_tokens"], peak * eng.geometry.page_bytes(16, "float32"),
                      time.perf_counter() - t)
    (p1, kv1, t1), (p0, kv0, t0) = out[True], out[False]
    page = eng.geometry.page_bytes(16, "float32")  # all 256 samples resident at their full length:
    own = [(len(p) - 1 + 32 + 15) // 16 for p in prompts]
    full_shared = sum(((len(p) - 1) // 16) + 16 * (o - (len(p) - 1) // 16) for p, o in zip(prompts, own, strict=True))
    resident = f"all resident {full_shared * page / 2**20:.0f} vs {16 * sum(own) * page / 2**20:.0f} MiB"
    rows.append(("GRPO 16x16", "shared / unshared", 16 * 16 * 32 / t1, 16 * 16 * 32 / t0, float("nan"),
                 f"prefill tokens {p1} vs {p0} ({p0 / p1:.1f}x); KV {resident}; peak in use (32 slots) "
                 f"{kv1 / 2**20:.0f} vs {kv0 / 2**20:.0f} MiB",
                 ""))
    print(f"progress: {rows[-1]}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--only", default="uniform,long-tail,grpo")
    parser.add_argument("--size", default="60m", choices=sorted(dec.SIZES), help="model size (benchmarks/decode.py)")
    args = parser.parse_args()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cfg = dec.config(args.size)
    model = nj.init(cfg, seed=0)
    hf = None
    if not args.skip_hf:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_hf(tmp, format="llama")
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    bw = bandwidth()
    rows: list = []
    if "uniform" in args.only:
        uniform(model, hf, bw, rows)
    if "long-tail" in args.only:
        long_tail(model, hf, args.requests, rows)
    if "grpo" in args.only:
        grpo(model, rows)
    print(f"\n{cfg.num_params() / 1e6:.0f}M Llama, float32, greedy; bandwidth {bw / 1e9:.1f} GB/s; "
          f"jax {jax.__version__}; before: {load_before}; after: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}\n")
    super_kv = nj.preset("ln-super-49b").kv_cache_bytes_per_token("bfloat16")
    print(f"KV bytes per token, bf16: LN-Super {super_kv:,} (its Llama-3.3-70B parent: 80 layers x 8 KV heads x "
          f"128 x 2 x 2 = {80 * 8 * 128 * 2 * 2:,})\n")
    print("| workload | case | engine tok/s | static tok/s | transformers tok/s | notes | same tokens |")
    print("| --- | --- | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]} | {r[6]} |")


if __name__ == "__main__":
    main()
