"""The embedding worker: requests queued, batched together, encoded on one thread.

`Embedder.embed` is called from the event loop with one request's inputs (token id lists)
and awaits their vectors. The worker thread takes the oldest inputs of every waiting
request, in order, as many as fit one encode call (`batch_tokens` tokens and
`max_sequences` inputs: `plan_batch`), encodes them together and hands each request its
vectors when all of its inputs are done. So concurrent small requests share a call, and a
request with many inputs is spread over several, without holding the others back by more
than one call.

The queue is bounded in inputs (`max_waiting`): past it `embed` raises `EmbedderFull`
at once (an overload answer, not a wait). A request whose caller stops waiting (cancelled)
is dropped before its next input is encoded. `close` stops the thread after the call it is
in and fails whatever still waits with `EmbedderStopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from modelyard.engine.metrics import EmbeddingMetrics
from modelyard.errors import ModelyardError

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]


class EmbedderFull(ModelyardError, RuntimeError):
    """The queue holds `max_waiting` inputs already."""


class EmbedderStopped(ModelyardError, RuntimeError):
    """The embedder is shutting down."""


class Encoder(Protocol):
    """What the worker runs: one call encodes several inputs (`LlamaEmbeddingModel`)."""

    dimensions: int
    max_sequences: int

    def encode(self, inputs: Sequence[Sequence[int]]) -> Vectors: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Job:
    inputs: Sequence[Sequence[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Vectors]
    vectors: Vectors
    scheduled: int = 0
    """Inputs handed to the encoder so far (the next one to plan is this index)."""
    done: int = 0
    abandoned: bool = False
    """The caller stopped waiting: its inputs not yet encoded are dropped."""


@dataclass(frozen=True)
class _Slice:
    job: _Job
    start: int
    stop: int


def plan_batch(waiting: Sequence[_Job], batch_tokens: int, max_sequences: int) -> list[_Slice]:
    """The next encode call: the oldest unscheduled inputs, in order, while they fit (the
    first input that does not fit ends the plan, so no request is overtaken)."""
    plan: list[_Slice] = []
    tokens = sequences = 0
    for job in waiting:
        start = stop = job.scheduled
        while stop < len(job.inputs) and sequences < max_sequences \
                and tokens + len(job.inputs[stop]) <= batch_tokens:
            tokens += len(job.inputs[stop])
            sequences += 1
            stop += 1
        if stop > start:
            plan.append(_Slice(job, start, stop))
        if stop < len(job.inputs):
            break
    return plan


@dataclass
class Embedder:
    encoder: Encoder
    batch_tokens: int
    max_waiting: int = 4096
    """Inputs allowed to wait (a request larger than this is let in when none wait)."""
    metrics: EmbeddingMetrics = field(default_factory=EmbeddingMetrics)
    _waiting: deque[_Job] = field(default_factory=deque)
    _queued: int = 0
    """Inputs waiting, not yet handed to the encoder."""
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _stopping: bool = False
    _thread: threading.Thread | None = None
    encode_calls: int = 0
    """Encode calls run (for tests and metrics)."""

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="modelyard-embedder",
                                        daemon=True)
        self._thread.start()

    @property
    def dimensions(self) -> int:
        return self.encoder.dimensions

    async def embed(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        """One normalized vector per input (a row each), in order."""
        if any(not 0 < len(tokens) <= self.batch_tokens for tokens in inputs):
            raise ValueError(f"every input must hold 1 to {self.batch_tokens} tokens")
        if not inputs:
            return np.empty((0, self.dimensions), dtype=np.float32)
        loop = asyncio.get_running_loop()
        job = _Job(inputs, loop, loop.create_future(),
                   np.empty((len(inputs), self.dimensions), dtype=np.float32))
        with self._lock:
            if self._stopping:
                raise EmbedderStopped("the embedding model is shutting down")
            if self._queued and self._queued + len(inputs) > self.max_waiting:
                self.metrics.rejected.inc()
                raise EmbedderFull(f"{self._queued} inputs are already waiting")
            self._waiting.append(job)
            self._queued += len(inputs)
            self.metrics.waiting.set(self._queued)
            self._lock.notify()
        try:
            return await job.future
        finally:
            # (a cancelled wait cancels the future too)
            if job.future.cancelled() or not job.future.done():
                with self._lock:
                    job.abandoned = True

    async def close(self) -> None:
        """Stop after the current call; fail what still waits; free the model."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            self.encoder.close()

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._next_plan_ready():
                    self._lock.wait()
                if self._stopping:
                    self._fail_waiting()
                    return
                plan = plan_batch(self._waiting, self.batch_tokens, self.encoder.max_sequences)
                for part in plan:
                    part.job.scheduled = part.stop
                    self._queued -= part.stop - part.start
                while self._waiting and self._waiting[0].scheduled == \
                        len(self._waiting[0].inputs):
                    self._waiting.popleft()
                self.metrics.waiting.set(self._queued)
            self._encode(plan)

    def _next_plan_ready(self) -> bool:
        """Drop abandoned requests; whether any input waits."""
        kept = deque(job for job in self._waiting if not job.abandoned)
        for job in self._waiting:
            if job.abandoned:
                self._queued -= len(job.inputs) - job.scheduled
        self._waiting = kept
        return bool(kept)

    def _encode(self, plan: list[_Slice]) -> None:
        inputs = [tokens for part in plan for tokens in part.job.inputs[part.start:part.stop]]
        started = time.perf_counter()
        try:
            vectors = self.encoder.encode(inputs)
        except Exception as exc:  # a failure of llama.cpp: the requests in it fail
            logger.exception("encoding %d inputs failed", len(inputs))
            self._fail([part.job for part in plan], exc)
            return
        self.encode_calls += 1
        tokens = sum(len(tokens) for tokens in inputs)
        metrics = self.metrics
        metrics.call_seconds.observe(time.perf_counter() - started)
        metrics.inputs_per_call.observe(len(inputs))
        metrics.tokens_per_call.observe(tokens)
        metrics.embedded_tokens.inc(tokens)
        row = 0
        for part in plan:
            job = part.job
            count = part.stop - part.start
            job.vectors[part.start:part.stop] = vectors[row:row + count]
            row += count
            job.done += count
            if job.done == len(job.inputs):
                _call(job.loop, _resolve, job.future, job.vectors)

    def _fail(self, jobs: list[_Job], error: BaseException) -> None:
        with self._lock:
            for job in jobs:  # what is left of them is dropped before the next plan
                job.abandoned = True
        for job in jobs:
            _call(job.loop, _reject, job.future, error)

    def _fail_waiting(self) -> None:
        stopped = EmbedderStopped("the embedding model is shutting down")
        for job in self._waiting:
            _call(job.loop, _reject, job.future, stopped)
        self._waiting.clear()
        self._queued = 0


def _call(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # a loop already closed: nobody waits any more
        loop.call_soon_threadsafe(callback, *args)


def _resolve(future: asyncio.Future[Vectors], vectors: Vectors) -> None:
    if not future.done():
        future.set_result(vectors)


def _reject(future: asyncio.Future[Vectors], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
