"""Host-side scheduling: which requests prefill, which decode, who holds which pages.

A request moves WAITING -> PREFILL -> RUNNING -> DONE. It takes a slot (its row of per-slot device
state: the think-budget state machine) when first admitted and keeps it until it ends, so a
preempted request resumes exactly where it was. Every sequence's KV covers its known tokens but the
last (prompt + generated so far); that last token is what its next decode step feeds.

- Prefill is chunked: each engine step spends at most `prefill_tokens` tokens over at most
  `prefill_rows` sequences, interleaved with the decode steps of the running ones.
- Admission is by free pages and slots. A request whose group (the n samples of one prompt) is
  still prefilling the shared prompt waits for it, then takes the prompt's full pages from the
  prefix table and prefills only the partial last page.
- Decode reserves pages for the tokens of the coming call; when the pool is short the newest
  request holding pages is preempted (its pages freed, recomputed from its tokens when it comes
  back). A request that could never fit the pool is refused when added, so nothing is truncated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable

from nemotron_jax.engine.pages import PageAllocator

WAITING, PREFILL, RUNNING, DONE = "waiting", "prefill", "running", "done"


@dataclasses.dataclass
class Request:
    id: Hashable
    prompt: list[int]
    max_new: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    sample_index: int
    stop_ids: tuple[int, ...]
    think_budget: int | None
    group: Hashable | None
    order: int  # arrival order: admission is FIFO, preemption LIFO
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # positions whose keys/values are in `pages`
    slot: int | None = None
    state: str = WAITING
    fresh: bool = True  # its think state has not been initialised yet
    prefilled: int = 0  # tokens this request pushed through prefill (sharing and recompute show here)
    preemptions: int = 0

    @property
    def known(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def target(self) -> int:
        """Positions that must hold KV before the next decode step (all known tokens but the last)."""
        return len(self.prompt) + len(self.tokens) - 1


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_batch: int, prefill_tokens: int, prefill_rows: int):
        self.pages, self.max_batch = allocator, max_batch
        self.prefill_tokens, self.prefill_rows = prefill_tokens, prefill_rows
        self.requests: dict[Hashable, Request] = {}
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self._order = 0
        self._held: dict[Hashable, list[int]] = {}  # a group's prompt pages, kept for members not yet admitted

    # ------------------------------------------------------------------ bookkeeping
    def next_order(self) -> int:
        self._order += 1
        return self._order

    def add(self, req: Request) -> None:
        need = self.pages_for(len(req.prompt) + req.max_new - 1)
        if need > self.pages.capacity:
            raise ValueError(f"request {req.id!r} needs {need} pages (prompt {len(req.prompt)} + max_new_tokens "
                             f"{req.max_new}) but the pool holds {self.pages.capacity}; raise num_pages")
        self.requests[req.id] = req

    def pages_for(self, positions: int) -> int:
        return math.ceil(max(positions, 0) / self.pages.page_size)

    def live(self, *states: str) -> list[Request]:
        return sorted((r for r in self.requests.values() if r.state in states), key=lambda r: r.order)

    def release(self, req: Request) -> None:
        """Free the pages and slot of a request that ended (finished or aborted)."""
        self.pages.free(req.pages)
        req.pages, req.computed, req.state = [], 0, DONE
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None
        del self.requests[req.id]
        self._drop_hold(req.group)

    def preempt(self, req: Request) -> None:
        """Free a request's pages; it keeps its slot and tokens and is recomputed when it returns."""
        self.pages.free(req.pages)
        req.pages, req.computed, req.state = [], 0, WAITING
        req.preemptions += 1

    def _grow(self, req: Request, positions: int) -> bool:
        """Pages so that `req` covers `positions`; False (nothing taken) when the pool is short."""
        extra = self.pages_for(positions) - len(req.pages)
        if extra <= 0:
            return True
        got = self.pages.alloc(extra)
        if got is None:
            return False
        req.pages.extend(got)
        return True

    # ------------------------------------------------------------------ planning
    def plan_prefill(self) -> list[tuple[Request, int, int]]:
        """(request, start, stop) chunks for this step's prefill call, admitting waiting requests
        while tokens, rows, slots and pages allow. Requests already complete move to RUNNING."""
        chunks: list[tuple[Request, int, int]] = []
        budget = self.prefill_tokens
        busy_groups = {r.group for r in self.live(PREFILL) if r.group is not None}
        for req in self.live(PREFILL, WAITING):
            if budget <= 0 or len(chunks) >= self.prefill_rows:
                break
            newly = req.state == WAITING
            if newly:
                if req.group is not None and req.group in busy_groups:
                    continue  # its group's prompt is being prefilled: share it once that is done
                if req.slot is None and not self.free_slots:
                    break
                if req.slot is None:
                    req.slot = self.free_slots.pop()
                shared = self.pages.share(req.known, req.target)
                req.pages, req.computed, req.state = shared, len(shared) * self.pages.page_size, PREFILL
                self._drop_hold(req.group)
            if req.computed >= req.target:
                self._finish_prefill(req)
                continue
            stop = min(req.target, req.computed + budget)
            while not self._grow(req, stop):
                newer = [r for r in self.live(PREFILL) if r.order > req.order]
                if not newer:
                    break
                self.preempt(newer[-1])
            if self.pages_for(stop) > len(req.pages):  # still short: wait for pages to come back
                if newly:
                    self._unadmit(req)
                break
            if req.group is not None:
                busy_groups.add(req.group)
            chunks.append((req, req.computed, stop))
            budget -= stop - req.computed
        return chunks

    def _unadmit(self, req: Request) -> None:
        self.pages.free(req.pages)
        req.pages, req.computed, req.state = [], 0, WAITING
        if req.fresh and not req.tokens and req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None

    def commit_prefill(self, chunks: list[tuple[Request, int, int]]) -> None:
        """After the prefill call: advance each chunk's request; completed prompts enter the prefix table."""
        for req, start, stop in chunks:
            req.computed = stop
            req.prefilled += stop - start
            if req.computed >= req.target:
                self._finish_prefill(req)

    def _finish_prefill(self, req: Request) -> None:
        self.pages.register(req.known, req.pages, req.computed)
        req.state = RUNNING
        if req.group is not None and req.group not in self._held and self._waiting_in(req.group):
            # The group's other samples take these pages when admitted, even if this one ends first.
            held = req.pages[:req.computed // self.pages.page_size]
            self.pages.retain(held)
            self._held[req.group] = held

    def _waiting_in(self, group: Hashable) -> bool:
        return any(r.group == group and r.state == WAITING for r in self.requests.values())

    def _drop_hold(self, group: Hashable | None) -> None:
        """Let go of a group's held prompt pages once no member waits for them."""
        if group in self._held and not self._waiting_in(group):
            self.pages.free(self._held.pop(group))

    def plan_decode(self, steps: int) -> list[tuple[Request, int]]:
        """(request, tokens this call may emit) for every running request, reserving their pages;
        when the pool is short, preempts the newest holders first."""
        batch: list[tuple[Request, int]] = []
        for req in self.live(RUNNING):
            if req.state != RUNNING:
                continue  # preempted by an older request in this loop
            n = min(steps, req.max_new - len(req.tokens))
            while not self._grow(req, req.target + n):
                victim = self.live(PREFILL, RUNNING)[-1]
                self.preempt(victim)
                batch = [(r, k) for r, k in batch if r is not victim]
                if victim is req:
                    break
            if req.state == RUNNING:
                batch.append((req, n))
            if len(batch) == self.max_batch:
                break
        return batch
