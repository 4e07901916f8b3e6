"""Pallas kernels vs XLA (and cuDNN) on realistic shapes, or a correctness check on tiny ones.

    python benchmarks/kernels.py                  # GPU: timings (a few minutes); CPU: --check
    python benchmarks/kernels.py --check          # tiny shapes, kernels vs references, exit 1 on error
    python benchmarks/kernels.py --seqs 8192 --block-q 128 --block-k 128   # tune the flash blocks

Attention: head_dim 128, 32 query / 8 KV heads, bf16, causal, `--tokens` per batch (B = tokens /
seq), forward and forward+backward, against `jax.nn.dot_product_attention` with implementation
"xla" and "cudnn". Decode: one query per row against a bf16 cache with ragged lengths; GB/s counts
the cache bytes the rows can see. FFN: SwiGLU at hidden 8192 / width 28672 (Llama-Nemotron-Super
sized), fused Pallas vs XLA. TFLOP/s count useful FLOPs (causal half, no recompute), against the
chip's peak where known (H200: 990 dense bf16 spec, ~790 measured; 4.8 TB/s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax import kernels
from nemotron_jax.kernels.decode_attention import decode_attention
from nemotron_jax.kernels.flash_attention import flash_attention
from nemotron_jax.kernels.reference import dot_product_attention, swiglu
from nemotron_jax.kernels.swiglu import fused_swiglu

# device kind substring -> (spec bf16 dense FLOP/s, measured bf16 FLOP/s, HBM bytes/s)
PEAKS = {"H200": (990e12, 790e12, 4.8e12), "H100": (989e12, 750e12, 3.35e12)}


def peak() -> tuple[float, float, float] | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAKS.items() if k in kind), None)


def timeit(fn: Callable, *args, iters: int) -> float:
    """Median seconds per call of jit(fn) after two warm-up calls (compile excluded)."""
    f = jax.jit(fn)
    for _ in range(2):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, shape: str, fn: Callable, args: tuple, flops: float, nbytes: float, iters: int) -> None:
    try:
        sec = timeit(fn, *args, iters=iters)
    except Exception as e:  # OOM or an implementation this build lacks: report and go on
        print(f"  {name:<22} {shape:<28} {'-':>9}   {type(e).__name__}: {str(e).splitlines()[0][:70]}")
        return
    p = peak()
    line = f"  {name:<22} {shape:<28} {sec * 1e3:9.3f} ms  {flops / sec / 1e12:7.1f} TFLOP/s"
    if p:
        line += f" ({100 * flops / sec / p[1]:4.1f}% of measured, {100 * flops / sec / p[0]:4.1f}% of spec peak)"
    if nbytes:
        line += f"  {nbytes / sec / 1e9:8.1f} GB/s" + (f" ({100 * nbytes / sec / p[2]:4.1f}% of HBM)" if p else "")
    print(line)


def with_grad(attn: Callable) -> Callable:
    """(q, k, v, dout, *rest) -> (out, (dq, dk, dv)) for attn(q, k, v, *rest)."""
    def run(q, k, v, dout, *rest):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, *rest), q, k, v)
        return out, vjp(dout)
    return run


def _pallas_flash(blocks: dict[str, int]) -> Callable:
    return lambda q, k, v, pos: flash_attention(q, k, v, pos, pos, **blocks)


def _jax_causal(impl: str) -> Callable:
    return lambda q, k, v, pos: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def bench_attention(args: argparse.Namespace) -> None:
    n, kh, h, dt = 32, 8, 128, jnp.bfloat16
    blocks = dict(kernels.GPU_BLOCKS["flash"])
    blocks.update({k: v for k, v in vars(args).items() if k.startswith("block_") and v})
    print(f"attention: N={n} K={kh} H={h} bf16 causal; pallas blocks {blocks}")
    for t in args.seqs:
        b = max(1, args.tokens // t)
        rng = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(rng[0], (b, t, n, h), dt)
        k, v = (jax.random.normal(r, (b, t, kh, h), dt) for r in rng[1:3])
        dout = jax.random.normal(rng[3], (b, t, n, h), dt)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        fwd_flops = 4 * b * n * t * t * h / 2
        impls = {"pallas": _pallas_flash(blocks), "cudnn": _jax_causal("cudnn")}
        if b * n * t * t * 4 > 24e9:
            print(f"  {'xla':<22} T={t}: skipped (the [B,N,T,S] logits would be {b * n * t * t * 4 / 1e9:.0f} GB)")
        else:
            impls["xla"] = _jax_causal("xla")
        for name, attn in impls.items():
            shape = f"B={b} T={t}"
            report(f"{name} fwd", shape, attn, (q, k, v, pos), fwd_flops, 0, args.iters)
            report(f"{name} fwd+bwd", shape, with_grad(attn), (q, k, v, dout, pos), 3.5 * fwd_flops, 0, args.iters)


def bench_decode(args: argparse.Namespace) -> None:
    n, kh, h, dt = 32, 8, 128, jnp.bfloat16
    print(f"decode: T=1 N={n} K={kh} H={h} bf16 cache, ragged lengths in [S/2, S)")
    blocks = kernels.GPU_BLOCKS["decode"]
    impls = {
        "pallas": lambda q, k, v, q_pos, slots: decode_attention(q, k, v, q_pos, slots, **blocks),
        "xla (model ref)": dot_product_attention,
        "jax.nn xla": lambda q, k, v, q_pos, slots: jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=q_pos[:, 0] + 1, implementation="xla"),
        "jax.nn cudnn": lambda q, k, v, q_pos, slots: jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=q_pos[:, 0] + 1, implementation="cudnn"),
    }
    for b, s in ((args.decode_batch, s) for s in args.decode_seqs):
        keys = jax.random.split(jax.random.key(1), 3)
        q = jax.random.normal(keys[0], (b, 1, n, h), dt)
        k, v = (jax.random.normal(r, (b, s, kh, h), dt) for r in keys[1:])
        q_pos = jnp.asarray(np.random.default_rng(0).integers(s // 2, s, (b, 1)), jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(s), (b, s))
        seen = float(jnp.sum(q_pos + 1))
        visible_bytes, flops = 2 * seen * kh * h * 2, 4 * seen * n * h  # K and V the rows may read
        for name, attn in impls.items():
            report(name, f"B={b} S={s}", attn, (q, k, v, q_pos, slots), flops, visible_bytes, args.iters)


def bench_ffn(args: argparse.Namespace) -> None:
    (m, (d, f)), dt = (args.ffn_tokens, args.ffn_dims), jnp.bfloat16
    print(f"ffn: SwiGLU M={m} D={d} F={f} bf16")
    keys = jax.random.split(jax.random.key(2), 5)
    h = jax.random.normal(keys[0], (1, m, d), dt)
    gate, up = (jax.random.normal(k, (d, f), dt) * d ** -0.5 for k in keys[1:3])
    down = jax.random.normal(keys[3], (f, d), dt) * f ** -0.5
    dy = jax.random.normal(keys[4], (1, m, d), dt)
    flops = 6 * m * d * f
    impls = {"pallas": lambda *a: fused_swiglu(*a, **kernels.GPU_BLOCKS["swiglu"]), "xla": swiglu}
    for name, ffn in impls.items():
        report(f"{name} fwd", f"M={m}", ffn, (h, gate, up, down), flops, 0, args.iters)
        grad = lambda dy, *a, ffn=ffn: jax.vjp(ffn, *a)[1](dy)
        report(f"{name} fwd+bwd", f"M={m}", grad, (dy, h, gate, up, down), 3 * flops, 0, args.iters)


def check() -> bool:
    """Tiny shapes through the dispatcher (interpret mode on CPU) vs the XLA references."""
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    ok = True

    def compare(name: str, got, want, tol: float = 1e-4) -> None:
        nonlocal ok
        pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
        ok &= err <= tol
        print(f"  {name:<34} max abs error {err:.2e}  {'ok' if err <= tol else 'FAIL'}")

    q, k, v, dout = r(2, 40, 4, 16), r(2, 40, 2, 16), r(2, 40, 2, 16), r(2, 40, 4, 16)
    seg = jnp.asarray(np.repeat([[0] * 23 + [1] * 17], 2, 0))
    pos = jnp.where(seg == 1, jnp.arange(40) - 23, jnp.arange(40))
    grads = lambda attn: jax.jit(with_grad(attn))(q, k, v, dout, pos, pos, seg, seg)
    compare("flash attention fwd+bwd (packed)", grads(kernels.pallas_attention), grads(dot_product_attention))
    slots = jnp.broadcast_to(jnp.arange(40), (2, 40))
    qd, qpos = r(2, 1, 4, 16), jnp.asarray([[7], [39]])
    compare("decode attention (ragged)", jax.jit(kernels.pallas_attention)(qd, k, v, qpos, slots),
            dot_product_attention(qd, k, v, qpos, slots))
    h, g, u, d, dy = r(2, 9, 32), r(32, 256) / 6, r(32, 256) / 6, r(256, 32) / 16, r(2, 9, 32)
    ffn_grads = lambda ffn: jax.jit(lambda *a: jax.vjp(ffn, *a)[1](dy))(h, g, u, d)
    compare("fused swiglu fwd", jax.jit(kernels.pallas_swiglu)(h, g, u, d), swiglu(h, g, u, d))
    compare("fused swiglu bwd", ffn_grads(kernels.pallas_swiglu), ffn_grads(swiglu))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness on tiny shapes (default on CPU)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per attention batch (B = tokens / T)")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--decode-seqs", type=int, nargs="+", default=[8192, 32768], help="cache lengths")
    parser.add_argument("--ffn-tokens", type=int, default=8192)
    parser.add_argument("--ffn-dims", type=int, nargs=2, default=[8192, 28672], metavar=("D", "F"))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--block-q", type=int, default=None, help="flash forward q block (default: kernels')")
    parser.add_argument("--block-k", type=int, default=None, help="flash forward kv block")
    parser.add_argument("--block-outer-bwd", type=int, default=None, help="rows a flash backward program owns")
    parser.add_argument("--block-inner-bwd", type=int, default=None, help="rows a flash backward program steps by")
    parser.add_argument("--only", choices=("attention", "decode", "ffn"), default=None)
    parser.add_argument("--bench", action="store_true",
                        help="time even on CPU (interpret mode: only with tiny shapes, to test this script)")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0].device_kind}")
    if args.check or (jax.default_backend() == "cpu" and not args.bench):
        print("correctness check (interpret mode on CPU):")
        return 0 if check() else 1
    for kind, fn in (("attention", bench_attention), ("decode", bench_decode), ("ffn", bench_ffn)):
        if args.only in (None, kind):
            fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
