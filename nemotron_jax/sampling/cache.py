"""KV-cache sizing: bytes held, and the shape buckets that bound recompilation.

The cache itself is `Transformer.init_cache`: one `KVCache` per GQA layer, shaped by that layer's
own KV heads, and `None` for linear / no-op attention, so a model with attention removed really
holds less. Jitted sampling functions compile once per (batch bucket, prompt bucket, cache
bucket); every size is rounded up to a power of two so that calls with nearby sizes share one
compiled program.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from nemotron_jax.model.attention import KVCache
from nemotron_jax.model.transformer import Transformer

CACHE_DTYPES = ("float32", "bfloat16")
MIN_BATCH, MIN_PROMPT, MIN_CACHE = 1, 16, 64


def cache_bytes(cache: Sequence[KVCache | None]) -> int:
    """Bytes held by a cache: the K and V arrays of its GQA layers (other layers hold nothing)."""
    return sum(int(a.nbytes) for layer in cache if layer is not None for a in layer)


def pow2_bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), but never above `cap` (when n <= cap)."""
    b = max(minimum, 1)
    while b < n:
        b *= 2
    return b if cap is None else max(n, min(b, cap))


def check_cache_dtype(dtype: str) -> str:
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
    return dtype


def abstract_cache_bytes(module: Transformer, batch: int, max_len: int, dtype: str = "bfloat16") -> int:
    """`cache_bytes` of the cache `module.init_cache` would build, without allocating it."""
    shapes = jax.eval_shape(lambda: module.init_cache(batch, max_len, dtype))
    return sum(int(a.size) * a.dtype.itemsize for layer in shapes if layer is not None for a in layer)
