"""The paged KV cache: device pools shaped by the architecture, and the host-side page allocator.

Only GQA layers hold keys and values, and each has its own KV heads, so layers are grouped by KV
geometry (K heads x H head dim) and each group gets one pool pair `k/v_LxPxSxKxH` (L = that
group's layers). A page id names the same slab in every pool, so one page table per sequence
serves all layers; a linear / no-op attention layer holds nothing.

Page 0 is the scratch page: padding rows, finished rows and page-table entries past a sequence's
end point there; it is never handed out, so whatever lands in it is never read unmasked.

Pages are reference counted. Full pages of prompt tokens are also entered in a prefix table keyed
by the tokens they cover (and all before them), so a request whose prompt starts the same way
(the n samples of one prompt, a shared system prompt) takes those pages instead of recomputing
them. A page leaves the table when its last holder frees it.

Legend: L layers in a pool, P pages, S page size, K KV heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nemotron_jax.model.attention import GQAttention
from nemotron_jax.model.transformer import Transformer
from nemotron_jax.sharding import Layout

POOL_AXES = (None, None, None, "act_kv_heads", None)  # [L, P, S, K, H]: heads over tensor
SCRATCH = 0


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where each GQA layer's cache lives: `slot[i]` = (pool, index in pool) or None for layer i."""

    shapes: tuple[tuple[int, int, int], ...]  # per pool: (layers, K, H)
    slot: tuple[tuple[int, int] | None, ...]

    @classmethod
    def of(cls, module: Transformer) -> Geometry:
        groups: dict[tuple[int, int], list[int]] = {}
        slot: list[tuple[int, int] | None] = []
        for layer in module.layers:
            att = layer.attention
            if isinstance(att, GQAttention):
                members = groups.setdefault((att.num_kv_heads, att.head_dim), [])
                slot.append((list(groups).index((att.num_kv_heads, att.head_dim)), len(members)))
                members.append(len(slot) - 1)
            else:
                slot.append(None)
        shapes = tuple((len(m), k, h) for (k, h), m in groups.items())
        return cls(shapes, tuple(slot))

    def page_bytes(self, page_size: int, dtype: str) -> int:
        """Bytes of one page across every pool (keys and values)."""
        item = jnp.dtype(dtype).itemsize
        return sum(2 * n * page_size * k * h * item for n, k, h in self.shapes)


def init_pools(geometry: Geometry, num_pages: int, page_size: int, dtype: str,
               layout: Layout | None = None) -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed (k, v) pools, one pair per geometry, KV heads sharded over `tensor` under a layout."""
    pools = []
    for n, k, h in geometry.shapes:
        shape = (n, num_pages, page_size, k, h)
        if layout is None:
            make = lambda s=shape: jnp.zeros(s, dtype)
        else:
            make = jax.jit(lambda s=shape: jnp.zeros(s, dtype), out_shardings=layout.sharding(POOL_AXES, shape))
        pools.append((make(), make()))
    return pools


def default_num_pages(geometry: Geometry, page_size: int, dtype: str, max_batch: int, max_len: int,
                      fraction: float = 0.3) -> int:
    """Enough pages for `max_batch` full-length sequences, capped at `fraction` of free memory."""
    want = max_batch * math.ceil(max_len / page_size) + 1
    page = max(1, geometry.page_bytes(page_size, dtype))
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:  # CPU: physical memory
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(max(2, min(want, int(free * fraction) // page)))


class PageAllocator:
    """Free list, reference counts and the prefix table (host side; no device work)."""

    def __init__(self, num_pages: int, page_size: int, sharing: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
        self.num_pages, self.page_size, self.sharing = num_pages, page_size, sharing
        self._free = list(range(num_pages - 1, SCRATCH, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._prefix: dict[tuple[int, ...], int] = {}
        self._key_of: dict[int, tuple[int, ...]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, count: int) -> list[int] | None:
        """`count` fresh pages, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        out = [self._free.pop() for _ in range(count)]
        for p in out:
            self._refs[p] = 1
        return out

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; a page with none left is free again."""
        for p in pages:
            self._refs[p] -= 1
            assert self._refs[p] >= 0, f"page {p} freed twice"
            if self._refs[p] == 0:
                key = self._key_of.pop(p, None)
                if key is not None:
                    del self._prefix[key]
                self._free.append(p)

    def retain(self, pages: Sequence[int]) -> None:
        """One more reference to each page (a holder other than a sequence)."""
        for p in pages:
            assert self._refs[p] > 0, f"page {p} is not in use"
            self._refs[p] += 1

    def share(self, tokens: Sequence[int], limit: int) -> list[int]:
        """The pages already holding the longest run of full pages of `tokens[:limit]`, each with one
        more reference taken."""
        out: list[int] = []
        s = self.page_size
        for j in range(limit // s if self.sharing else 0):
            page = self._prefix.get(tuple(tokens[: (j + 1) * s]))
            if page is None:
                break
            out.append(page)
        for p in out:
            self._refs[p] += 1
        return out

    def register(self, tokens: Sequence[int], pages: Sequence[int], computed: int) -> None:
        """Enter the full pages among the first `computed` positions of `tokens` into the prefix table."""
        s = self.page_size
        for j in range(min(computed // s, len(pages))):
            key = tuple(tokens[: (j + 1) * s])
            if key not in self._prefix and pages[j] not in self._key_of:
                self._prefix[key] = pages[j]
                self._key_of[pages[j]] = key

    def refcount(self, page: int) -> int:
        return self._refs[page]
