"""What each candidate costs: parameter bytes, KV-cache bytes per token, prefill/decode time.

Runtimes are *measured* on the current backend with our own jitted model (SPEC §5): a model of
`repeats` copies of a block holding only that subblock is timed, minus a baseline model of one
identity block (embeddings, final norm and LM head only), divided by `repeats`; no-op costs 0.
Decode is timed as a jitted loop of `decode_steps` greedy steps against a KV cache filled to
`decode_context` (the cache is donated, as in real decoding); prefill as one forward of
[prefill_batch, prefill_seq]. Each time is the minimum over `rounds` of a median of three calls
(the minimum is what survives other processes sharing the machine). Results are cached in a
JSON file keyed by `jax.devices()[0].device_kind` and every shape that matters. `analytic` is
a roofline fallback: max(FLOPs / peak_flops, bytes / bandwidth). A whole model's speed-up over
the parent (`measured_speedup`, what constraints are checked against) is the median of paired
per-round ratios, which is far steadier than a ratio of separately measured times.

Legend: B batch, T prompt tokens, S cache slots, D hidden, N/K query/KV heads, H head dim, F width.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from nemotron_jax.config import AttentionConfig, BlockConfig, ModelConfig
from nemotron_jax.model.forward import forward
from nemotron_jax.model.params import abstract_model, assemble
from nemotron_jax.model.transformer import Policy, Transformer
from nemotron_jax.puzzle import subblocks as sb
from nemotron_jax.puzzle.config import CostConfig

_BYTES = {"float32": 4, "bfloat16": 2}
IDENTITY = BlockConfig(sb.NO_ATTENTION, sb.NO_FFN)


def static_costs(cfg: ModelConfig, variant: sb.Variant, dtype: str = "float32") -> dict[str, float]:
    """Parameter count and bytes, and KV-cache bytes per token, of one subblock."""
    single = cfg.replace(blocks=(sb.block_with(sb.plain_variant(variant)),), vocab_size=0, tie_word_embeddings=True)
    params = single.num_params() - cfg.hidden_size  # minus the final norm
    kv = 2 * variant.num_kv_heads * cfg.head_dim * _BYTES[dtype] if isinstance(variant, AttentionConfig) \
        and variant.kind == "gqa" else 0
    return {"params": params, "param_bytes": params * _BYTES[dtype], "kv_bytes_per_token": kv}


# ---------------------------------------------------------------- timing our own jitted model
def random_model(cfg: ModelConfig, dtype: str = "float32", seed: int = 0) -> Transformer:
    """A model with random weights made on the host (no jitted init to compile)."""
    policy = Policy(param_dtype=dtype)
    rng = np.random.default_rng(seed)
    flat = {p: jnp.asarray((rng.standard_normal(v.shape) * 0.02).astype(np.float32), dtype=dtype)
            for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg, policy), nnx.Param))}
    return assemble(cfg, policy, flat)


def _decode_fn(graphdef: nnx.GraphDef, steps: int) -> Callable[..., Any]:
    def run(state: nnx.State, tokens_Bx1: jax.Array, cache: Any, start: jax.Array) -> tuple[jax.Array, Any]:
        model = nnx.merge(graphdef, state)

        def body(i, carry):
            tok, cache = carry
            logits, cache = model(tok, jnp.broadcast_to(start + i, tok.shape), None, cache)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache

        return jax.lax.fori_loop(0, steps, body, (tokens_Bx1, cache))

    return jax.jit(run, donate_argnums=(2,))


def timer(model: Transformer, mode: str, c: CostConfig) -> Callable[[], float]:
    """A function that runs one prefill or decode call and returns its seconds (per token for decode)."""
    graphdef, state = nnx.split(model)
    if mode == "prefill":
        tokens = jnp.zeros((c.prefill_batch, c.prefill_seq), jnp.int32)

        def call() -> float:
            t0 = time.perf_counter()
            jax.block_until_ready(forward(graphdef, state, tokens))
            return time.perf_counter() - t0
        return call
    fn = _decode_fn(graphdef, c.decode_steps)
    holder = {"cache": model.init_cache(c.decode_batch, c.decode_context, c.dtype)}
    tokens = jnp.zeros((c.decode_batch, 1), jnp.int32)
    start = jnp.asarray(c.decode_context - c.decode_steps, jnp.int32)

    def call() -> float:
        t0 = time.perf_counter()
        _, holder["cache"] = jax.block_until_ready(fn(state, tokens, holder["cache"], start))
        return (time.perf_counter() - t0) / c.decode_steps
    return call


def measure(calls: list[Callable[[], float]], rounds: int) -> list[float]:
    """Interleaved timing: per call the minimum over rounds of the median of three runs."""
    for call in calls:
        call()  # compile and warm up
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for k, call in enumerate(calls):
            best[k] = min(best[k], statistics.median(call() for _ in range(3)))
    return best


@functools.lru_cache(maxsize=16)
def cached_timer(cfg: ModelConfig, mode: str, c: CostConfig) -> Callable[[], float]:
    """`timer` of a random model of `cfg`, compiled once per process (e.g. the parent, timed
    against every candidate child)."""
    return timer(random_model(cfg, c.dtype), mode, c)


# ---------------------------------------------------------------- analytic fallback
def analytic_time(cfg: ModelConfig, variant: sb.Variant | None, mode: str, c: CostConfig) -> float:
    """Roofline estimate of one subblock (None: embeddings + head) in seconds."""
    d, n, h, bpe = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, _BYTES[c.dtype]
    tokens = c.prefill_batch * c.prefill_seq if mode == "prefill" else c.decode_batch
    if variant is None:
        flops, nbytes = 2.0 * tokens * d * cfg.vocab_size, d * cfg.vocab_size * bpe
    elif variant.kind == "none":
        return 0.0
    elif variant.kind == "linear":
        flops, nbytes = 2.0 * tokens * d * d, d * d * bpe
    elif isinstance(variant, AttentionConfig):
        k = variant.num_kv_heads
        flops = 2.0 * tokens * d * (2 * n * h + 2 * k * h)
        nbytes = d * (2 * n * h + 2 * k * h) * bpe
        if mode == "prefill":
            flops += 4.0 * c.prefill_batch * c.prefill_seq ** 2 * n * h
        else:
            flops += 4.0 * c.decode_batch * c.decode_context * n * h
            nbytes += 2 * c.decode_batch * c.decode_context * k * h * bpe
    else:
        flops, nbytes = 6.0 * tokens * d * variant.intermediate_size, 3 * d * variant.intermediate_size * bpe
    return max(flops / c.peak_flops, nbytes / c.bandwidth)


# ---------------------------------------------------------------- the cost table
def _key(cfg: ModelConfig, what: str, mode: str, c: CostConfig) -> str:
    shapes = (f"prefill{c.prefill_batch}x{c.prefill_seq}" if mode == "prefill"
              else f"decode{c.decode_batch}x{c.decode_context}s{c.decode_steps}")
    return "|".join([jax.devices()[0].device_kind, f"d{cfg.hidden_size}n{cfg.num_attention_heads}h{cfg.head_dim}"
                     f"v{cfg.vocab_size}", what, shapes, c.dtype, f"r{c.repeats}"])


def cost_table(cfg: ModelConfig, variants: list[sb.Variant], c: CostConfig, cache_file: str | Path | None = None,
               progress: bool = False) -> dict[str, Any]:
    """{"overhead": {prefill_s, decode_s}, "variants": {name: {params, param_bytes,
    kv_bytes_per_token, prefill_s, decode_s}}, "device_kind", "method"} for `variants`."""
    cache_path = Path(cache_file) if cache_file else None
    cache: dict[str, float] = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    unique = {sb.variant_name(v): sb.plain_variant(v) for v in variants}
    table: dict[str, Any] = {"device_kind": jax.devices()[0].device_kind, "method": c.method, "overhead": {},
                             "variants": {name: static_costs(cfg, v, c.dtype) for name, v in unique.items()}}
    base_cfg = cfg.replace(blocks=(IDENTITY,))
    for mode in ("prefill", "decode"):
        if c.method == "analytic":
            table["overhead"][f"{mode}_s"] = analytic_time(cfg, None, mode, c)
            for name, v in unique.items():
                table["variants"][name][f"{mode}_s"] = analytic_time(cfg, v, mode, c)
            continue
        todo = [(name, v) for name, v in unique.items()
                if v.kind != "none" and _key(cfg, name, mode, c) not in cache]
        base_key = _key(cfg, "baseline", mode, c)
        if todo or base_key not in cache:
            stacks = [cfg.replace(blocks=(sb.block_with(v),) * c.repeats) for _, v in todo]
            calls = [timer(random_model(m, c.dtype), mode, c) for m in tqdm(
                [base_cfg, *stacks], desc=f"costs {mode}", disable=not progress, leave=False)]
            t_base, *t_stacks = measure(calls, c.rounds)
            cache[base_key] = t_base
            for (name, _), t in zip(todo, t_stacks, strict=True):
                cache[_key(cfg, name, mode, c)] = max(0.0, (t - t_base) / c.repeats)
        table["overhead"][f"{mode}_s"] = cache[base_key]
        for name, v in unique.items():
            table["variants"][name][f"{mode}_s"] = 0.0 if v.kind == "none" else cache[_key(cfg, name, mode, c)]
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            tmp.replace(cache_path)
    return table


def _timing_key(cfg: ModelConfig) -> ModelConfig:
    """The config without bookkeeping (`ffn_mult`) so equal shapes share one compiled timer."""
    return cfg.replace(blocks=tuple(BlockConfig(b.attention, sb.plain_variant(b.ffn)) for b in cfg.blocks))


def predicted_time(cfg: ModelConfig, table: dict[str, Any], mode: str) -> float:
    """Overhead + Σ subblock times of a whole model from the cost table."""
    key = f"{mode}_s"
    return table["overhead"][key] + sum(table["variants"][sb.variant_name(v)][key]
                                        for b in cfg.blocks for v in (b.attention, sb.plain_variant(b.ffn)))


def measured_speedup(parent: ModelConfig, child: ModelConfig, mode: str, c: CostConfig,
                     rounds: int | None = None) -> dict[str, float]:
    """Speed-up t_parent / t_child (same batch and context) as the median over rounds of paired
    ratios: each round times parent and child back to back (median of three calls each), so a
    burst of load from other processes shifts both sides of a ratio rather than one. The
    minimum times over rounds are reported too."""
    calls = [cached_timer(_timing_key(parent), mode, c), cached_timer(_timing_key(child), mode, c)]
    for call in calls:
        call()
    ratios, best = [], [float("inf")] * 2
    for _ in range(max(rounds or c.rounds, 1)):
        t = [statistics.median(call() for _ in range(3)) for call in calls]
        ratios.append(t[0] / max(t[1], 1e-12))
        best = [min(a, b) for a, b in zip(best, t, strict=True)]
    return {f"parent_{mode}_s": best[0], f"child_{mode}_s": best[1], "speedup": statistics.median(ratios)}
