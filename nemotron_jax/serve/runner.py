"""`EngineRunner`: the one thread that owns the (not thread-safe) engine, bridged to asyncio.

HTTP handlers never touch the engine. They put commands (add these requests, abort those) on a
thread-safe queue; the engine thread drains every queued command before each `step()`, so
requests that arrive while others decode join the same batch, and blocks on the queue when there
is no work. Each submission's token events come back, one list per step, on an `asyncio.Queue`
fed with `loop.call_soon_threadsafe`. A bad request fails in `add_request` (ValueError, raised to
the submitter) without touching the loop; a failing `step()` fails every live request with an
`EngineFailure` and the loop carries on, so one request can never stop the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from nemotron_jax.engine import Engine, SamplingOptions, TokenEvent

log = logging.getLogger(__name__)
Sink = Callable[[Any], None]  # receives list[TokenEvent] or an EngineFailure


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: Hashable
    prompt_ids: list[int]
    options: SamplingOptions
    group: Hashable | None = None


class EngineFailure(Exception):
    """`engine.step()` raised: every request in flight at that moment is dropped."""


@dataclasses.dataclass
class _Add:
    requests: Sequence[EngineRequest]
    sink: Sink
    done: concurrent.futures.Future


@dataclasses.dataclass
class _Abort:
    request_ids: Sequence[Hashable]


_STOP = object()


class EngineRunner:
    """Start with `start()` (the FastAPI lifespan does), submit with `await submit(...)`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[Hashable, Sink] = {}  # live request id -> its submission's sink (engine thread only)
        self._thread: threading.Thread | None = None
        self._counters = {"requests": 0, "aborted": 0, "steps": 0, "peak_batch": 0, "failures": 0}
        self._batch_sizes: dict[int, int] = {}  # requests that got tokens in one step -> steps
        self.stats = self._snapshot()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nemotron-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------- the asyncio side
    async def submit(self, requests: Sequence[EngineRequest]) -> asyncio.Queue:
        """Add `requests` (all or none: ValueError with the engine's reason); the queue their
        events arrive on, one list per engine step (or an `EngineFailure`)."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Add(list(requests), lambda item: loop.call_soon_threadsafe(events.put_nowait, item),
                                done))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self.abort([r.request_id for r in requests])
            raise
        return events

    def abort(self, request_ids: Sequence[Hashable]) -> None:
        """Drop requests and free their pages (unknown or finished ids are ignored). Thread-safe."""
        if request_ids:
            self._commands.put(_Abort(list(request_ids)))

    # ---------------------------------------------------------------- the engine thread
    def _loop(self) -> None:
        try:
            self._serve()
        except Exception:  # a bug here, not a bad request: say so to everyone waiting
            log.exception("the engine thread failed")
            raise
        finally:
            self._fail_all(EngineFailure("the engine thread stopped"))

    def _serve(self) -> None:
        engine = self.engine
        while True:
            try:
                commands = [self._commands.get()] if not engine.has_work() else []
                while True:
                    commands.append(self._commands.get_nowait())
            except queue.Empty:
                pass
            for cmd in commands:
                if cmd is _STOP:
                    return
                self._apply(cmd)
            if engine.has_work():
                self._step()
            self.stats = self._snapshot()

    def _fail_all(self, failure: EngineFailure) -> None:
        for rid, sink in list(self._sinks.items()):
            self.engine.abort(rid)
            sink(failure)
        self._sinks.clear()

    def _apply(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            for rid in cmd.request_ids:
                if self._sinks.pop(rid, None) is not None:
                    self.engine.abort(rid)
                    self._counters["aborted"] += 1
            return
        added = []
        try:
            for r in cmd.requests:
                added.append(self.engine.add_request(r.prompt_ids, r.options, r.request_id, group=r.group))
        except Exception as e:  # ValueError: the request is invalid; anything else must not kill the loop
            for rid in added:
                self.engine.abort(rid)
            cmd.done.set_exception(e if isinstance(e, ValueError) else RuntimeError(f"add_request failed: {e!r}"))
            return
        for rid in added:
            self._sinks[rid] = cmd.sink
        self._counters["requests"] += len(added)
        cmd.done.set_result(None)

    def _step(self) -> None:
        try:
            events: list[TokenEvent] = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; dropping %d live requests", len(self._sinks))
            self._counters["failures"] += 1
            self._fail_all(EngineFailure(f"the engine failed: {e!r}"))
            return
        self._counters["steps"] += 1
        by_sink: dict[int, tuple[Sink, list[TokenEvent]]] = {}
        for ev in events:
            sink = self._sinks.get(ev.request_id)
            if sink is None:
                continue  # aborted meanwhile
            by_sink.setdefault(id(sink), (sink, []))[1].append(ev)
            if ev.finished:
                del self._sinks[ev.request_id]
        size = len({e.request_id for e in events})
        self._counters["peak_batch"] = max(self._counters["peak_batch"], size)
        self._batch_sizes[size] = self._batch_sizes.get(size, 0) + 1
        for sink, evs in by_sink.values():
            sink(evs)

    def _snapshot(self) -> dict[str, Any]:
        """What GET /stats shows; rebuilt by the engine thread after each iteration."""
        return {**self._counters, "running": len(self._sinks), "free_pages": self.engine.free_pages,
                "num_pages": self.engine.num_pages, "batch_sizes": dict(self._batch_sizes),
                "engine": dict(self.engine.stats), "time": time.time()}
