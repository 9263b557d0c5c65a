"""Several local models in one server: each loaded on its first request into an engine of
its own, and unloaded when idle or when another needs its memory.

`LocalPool` owns the models' states (unloaded, loading, ready, unloading) and runs on the
event loop; a load (a blocking `Loader` call: the GGUF mapped, a llama.cpp context made,
an engine thread started) runs in a worker thread of its own, so the event loop and the
other models' requests go on meanwhile. A request for a model takes a `Lease` from its
preparation to the end of its stream: a model with a lease is never unloaded.

Memory: each model counts its estimate (file, KV cache, logits; models/gguf_memory.py)
from the moment its load starts until its engine is closed. A load that would exceed the
budget first unloads the least recently used models that hold no lease, and waits for
them to close; when even that cannot make room (the others are busy), the request waits
for a lease to end. Every wait is bounded by the load timeout: past it the request gets a
503 with Retry-After (the load itself goes on, for the next request).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from modelyard.errors import ModelyardError
from modelyard.providers.base import ChatModel, ProviderError

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
"""What a request that waited past the load timeout is told to wait before it retries."""
POLL_SECONDS = 0.25
"""How often a request waiting for room looks again (a lease ends on any thread)."""


class LoadState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"


class PoolError(ModelyardError, RuntimeError):
    """The models cannot fit the memory budget at all (a configuration error)."""


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    memory_bytes: int
    """The estimate of what it holds loaded."""
    preload: bool = False
    idle_unload_seconds: float = 0.0
    """0: never unloaded for being idle."""
    description: dict[str, Any] = field(default_factory=dict)
    """Its /v1/models fields until it has loaded once (then the engine's own)."""


Loader = Callable[[ModelSpec], ChatModel]
"""Loads a model (blocking; called in a worker thread); its `close()` unloads it."""


@dataclass
class _Entry:
    spec: ModelSpec
    state: LoadState = LoadState.UNLOADED
    provider: ChatModel | None = None
    leases: int = 0
    last_used: float = 0.0
    failures: int = 0
    description: dict[str, Any] = field(default_factory=dict)
    events: Counter[tuple[str, str]] = field(default_factory=Counter)
    """("load", "ok" | "failed") and ("unload", "idle" | "budget" | "shutdown") counts."""

    @property
    def holds_memory(self) -> bool:
        return self.state is not LoadState.UNLOADED


class Lease:
    """A request's hold on a loaded model; `release` (idempotent, any thread) ends it."""

    def __init__(self, pool: LocalPool, entry: _Entry) -> None:
        self._pool = pool
        self._entry = entry
        self._held = True

    def release(self) -> None:
        self._pool._release(self)

    def _end(self) -> bool:
        held, self._held = self._held, False
        return held


class LocalPool:
    def __init__(self, specs: list[ModelSpec], loader: Loader, *, memory_budget: int = 0,
                 reserved_bytes: int = 0, load_timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: what idle times and recency are read from (waits use real time)."""
        self._entries = {spec.model_id: _Entry(spec, description=dict(spec.description))
                         for spec in specs}
        self._loader = loader
        self.memory_budget = memory_budget
        self.reserved_bytes = reserved_bytes
        """Memory held outside the pool (the [model] engine), counted against the budget."""
        self.load_timeout_s = load_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        """Guards the entries' state, provider and leases (leases end on any thread)."""
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="modelyard-load")
        self._closed = False
        for spec in specs:
            if memory_budget and reserved_bytes + spec.memory_bytes > memory_budget:
                raise PoolError(
                    f"the model '{spec.model_id}' needs about {spec.memory_bytes} bytes "
                    f"loaded, more than engine.memory_budget ({memory_budget} bytes) leaves "
                    f"({memory_budget - reserved_bytes} bytes beside the [model] engine)")

    # -- what the routes show -------------------------------------------------------------

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._entries

    def state(self, model_id: str) -> LoadState:
        return self._entries[model_id].state

    def status(self, model_id: str) -> dict[str, Any]:
        """Its state and the memory it takes loaded (an estimate, in bytes)."""
        entry = self._entries[model_id]
        return {"state": entry.state.value, "memory_bytes": entry.spec.memory_bytes}

    def description(self, model_id: str) -> dict[str, Any]:
        return self._entries[model_id].description

    def used_bytes(self) -> int:
        return self.reserved_bytes + sum(e.spec.memory_bytes for e in self._entries.values()
                                         if e.holds_memory)

    # -- requests --------------------------------------------------------------------------

    def checkout(self, model_id: str) -> tuple[ChatModel, Lease] | None:
        """The model's engine and a lease on it, if it is ready (any thread, no wait)."""
        entry = self._entries[model_id]
        with self._lock:
            if entry.state is not LoadState.READY or entry.provider is None:
                return None
            entry.leases += 1
            entry.last_used = self._clock()
            return entry.provider, Lease(self, entry)

    def loaded(self, model_id: str) -> ChatModel | None:
        """Its engine if it is ready (no lease: for the tokenizer's lookups)."""
        entry = self._entries[model_id]
        return entry.provider if entry.state is LoadState.READY else None

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if not lease._end():
                return
            entry = lease._entry
            entry.leases -= 1
            entry.last_used = self._clock()

    async def acquire(self, model_id: str) -> ChatModel:
        """The model's engine once it is ready: loaded now if it is not (making room in
        the budget first), or waited for while it loads, within the load timeout."""
        entry = self._entries[model_id]
        if entry.state is LoadState.READY and entry.provider is not None:
            entry.last_used = self._clock()
            return entry.provider
        if self._closed:
            raise ProviderError(503, "the server is shutting down", code="server_shutting_down")
        self._start()
        deadline = time.monotonic() + self.load_timeout_s
        failures = entry.failures
        while True:
            if entry.state is LoadState.READY and entry.provider is not None:
                entry.last_used = self._clock()
                return entry.provider
            if entry.failures != failures:
                raise ProviderError(503, f"the model '{model_id}' could not be loaded; retry "
                                    "later", code="model_unavailable",
                                    retry_after=RETRY_AFTER_SECONDS)
            if entry.state is LoadState.UNLOADED and self._make_room_and_load(entry):
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = ("is loading" if entry.state is LoadState.LOADING else "is waiting for "
                       "memory that models with requests running hold")
                raise ProviderError(503, f"the model '{model_id}' {why}; retry shortly",
                                    code="model_loading", retry_after=RETRY_AFTER_SECONDS)
            await self._wait(min(remaining, POLL_SECONDS))

    def request_load(self, model_id: str) -> None:
        """Start loading the model from any thread (a worker that found it unloaded)."""
        loop = self._loop
        if loop is not None and not self._closed:
            loop.call_soon_threadsafe(self.load_in_background, model_id)

    def load_in_background(self, model_id: str) -> None:
        """Start loading the model (on the loop), nobody waiting for it."""
        self._loop = asyncio.get_running_loop()
        task = self._loop.create_task(self._quietly(model_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, model_id: str) -> None:
        with contextlib.suppress(ProviderError):
            await self.acquire(model_id)

    # -- loading and unloading ---------------------------------------------------------------

    def _make_room_and_load(self, entry: _Entry) -> bool:
        """Start the load if it fits (True); else unload the least recently used idle
        models that make it fit (the caller waits for them), or nothing if none can."""
        with self._lock:
            need = entry.spec.memory_bytes
            used = self.used_bytes()
            if not self.memory_budget or used + need <= self.memory_budget:
                entry.state = LoadState.LOADING
                self._spawn(self._load(entry))
                return True
            freeing = sum(e.spec.memory_bytes for e in self._entries.values()
                          if e.state is LoadState.UNLOADING)
            over = used - freeing + need - self.memory_budget
            idle = sorted((e for e in self._entries.values()
                           if e.state is LoadState.READY and e.leases == 0),
                          key=lambda e: e.last_used)
            victims: list[_Entry] = []
            for candidate in idle:
                if over <= 0:
                    break
                victims.append(candidate)
                over -= candidate.spec.memory_bytes
            if over > 0:
                return False  # the busy models hold too much: wait for their requests
            for victim in victims:
                self._begin_unload(victim, "budget")
            return False

    async def _load(self, entry: _Entry) -> None:
        spec = entry.spec
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            provider = await loop.run_in_executor(self._executor, self._loader, spec)
        except Exception as exc:
            logger.error("loading %s failed: %s", spec.model_id, exc)
            with self._lock:
                entry.state = LoadState.UNLOADED
                entry.failures += 1
                entry.events["load", "failed"] += 1
            self._notify()
            return
        logger.info("loaded %s in %.1f s", spec.model_id, time.monotonic() - started)
        with self._lock:
            entry.provider = provider
            entry.description = provider.describe()
            entry.state = LoadState.READY
            entry.last_used = self._clock()
            entry.events["load", "ok"] += 1
            closed = self._closed
        if closed:  # the server began to stop while it loaded
            with self._lock:
                self._begin_unload(entry, "shutdown")
        self._notify()

    def _begin_unload(self, entry: _Entry, reason: str) -> None:
        provider, entry.provider = entry.provider, None
        entry.state = LoadState.UNLOADING
        if provider is not None:
            self._spawn(self._unload(entry, provider, reason))

    async def _unload(self, entry: _Entry, provider: ChatModel, reason: str) -> None:
        try:
            await provider.close()
        except Exception:
            logger.exception("unloading %s failed", entry.spec.model_id)
        with self._lock:
            entry.state = LoadState.UNLOADED
            entry.events["unload", reason] += 1
        logger.info("unloaded %s (%s)", entry.spec.model_id, reason)
        self._notify()

    def unload_idle(self) -> list[str]:
        """Unload every model idle for its `idle_unload_seconds` (preloaded ones never)."""
        now = self._clock()
        unloaded = []
        with self._lock:
            for entry in self._entries.values():
                idle = entry.spec.idle_unload_seconds
                if entry.state is LoadState.READY and entry.leases == 0 and idle > 0 \
                        and not entry.spec.preload and now - entry.last_used >= idle:
                    self._begin_unload(entry, "idle")
                    unloaded.append(entry.spec.model_id)
        return unloaded

    def preload(self) -> None:
        """Load the `preload` models now, in order (blocking: before the server listens)."""
        wanted = [e for e in self._entries.values() if e.spec.preload]
        total = self.reserved_bytes + sum(e.spec.memory_bytes for e in wanted)
        if self.memory_budget and total > self.memory_budget:
            raise PoolError(f"the preloaded models need about {total} bytes with the [model] "
                            f"engine, more than engine.memory_budget ({self.memory_budget})")
        for entry in wanted:
            provider = self._loader(entry.spec)
            entry.provider, entry.state = provider, LoadState.READY
            entry.description = provider.describe()
            entry.last_used = self._clock()
            entry.events["load", "ok"] += 1

    async def close(self) -> None:
        """Unload every model (at shutdown; idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        with self._lock:
            for entry in self._entries.values():
                if entry.state is LoadState.READY:
                    self._begin_unload(entry, "shutdown")
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- plumbing ---------------------------------------------------------------------------

    def _start(self) -> None:
        """On the first request: remember the loop, start the idle reaper."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        idle = [e.spec.idle_unload_seconds for e in self._entries.values()
                if e.spec.idle_unload_seconds > 0 and not e.spec.preload]
        if self._reaper is None and idle:
            self._reaper = self._loop.create_task(self._reap(min(max(min(idle) / 4, 0.5),
                                                                 30.0)))

    async def _reap(self, interval: float) -> None:
        while not self._closed:
            await asyncio.sleep(interval)
            self.unload_idle()

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    # -- metrics ----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The per-model gauges and counters at /metrics (a prometheus_client collector)."""
        state = GaugeMetricFamily("modelyard_local_model_state",
                                  "1 for the state a local model is in.",
                                  labels=["model", "state"])
        memory = GaugeMetricFamily("modelyard_local_model_memory_bytes",
                                   "Memory a local model holds (its estimate; 0 unloaded).",
                                   labels=["model"])
        requests = GaugeMetricFamily("modelyard_local_model_requests",
                                     "Requests holding a local model (prepared or running).",
                                     labels=["model"])
        loads = CounterMetricFamily("modelyard_local_model_loads", "Loads, by outcome.",
                                    labels=["model", "outcome"])
        unloads = CounterMetricFamily("modelyard_local_model_unloads", "Unloads, by reason.",
                                      labels=["model", "reason"])
        for model_id, entry in self._entries.items():
            for value in LoadState:
                state.add_metric([model_id, value.value], float(entry.state is value))
            memory.add_metric([model_id], float(entry.spec.memory_bytes
                                                if entry.holds_memory else 0))
            requests.add_metric([model_id], float(entry.leases))
            for (kind, label), count in sorted(entry.events.items()):
                (loads if kind == "load" else unloads).add_metric([model_id, label], count)
        budget = GaugeMetricFamily("modelyard_local_memory_budget_bytes",
                                   "engine.memory_budget (0: none).", value=self.memory_budget)
        used = GaugeMetricFamily("modelyard_local_memory_used_bytes",
                                 "Memory the local models hold, the [model] engine included.",
                                 value=self.used_bytes())
        yield from (state, memory, requests, loads, unloads, budget, used)
