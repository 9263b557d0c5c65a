"""The engine loop: schedule -> run -> postprocess, on its own thread.

The event loop submits requests and reads their outputs through asyncio queues; the
engine thread owns the scheduler and the runner. `llama_decode` releases the GIL, so
HTTP work goes on while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from modelyard.engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from modelyard.engine.metrics import EngineMetrics
from modelyard.engine.runner import BatchItem, LlamaRunner
from modelyard.engine.sampling import Sampler
from modelyard.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from modelyard.engine.sequence import FinishReason, SamplingParams, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOutput:
    """New text of one request since its last output, and its end when it has ended."""

    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None


@dataclass(eq=False)
class _Request:
    seq: Sequence
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    queue: asyncio.Queue[EngineOutput]
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


class Engine:
    def __init__(self, runner: LlamaRunner, config: SchedulerConfig,
                 metrics: EngineMetrics | None = None) -> None:
        self.runner = runner
        self.scheduler = Scheduler(config)
        self.metrics = metrics or EngineMetrics()
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="modelyard-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the event-loop side ---------------------------------------------------------------

    def submit(self, request_id: str, prompt_ids: list[int],
               params: SamplingParams) -> asyncio.Queue[EngineOutput]:
        """Queue a request; raises `QueueFullError` at once when the waiting queue is full."""
        loop = asyncio.get_running_loop()
        seq = Sequence(request_id, prompt_ids, params, eog_ids=self.runner.eog_ids)
        request = _Request(seq, Sampler(params), IncrementalDetokenizer(self.runner.token_bytes),
                           StopStringMatcher(params.stop), asyncio.Queue(), loop)
        with self._lock:
            try:
                self.scheduler.add(seq)
            except Exception:
                self.metrics.rejected.inc()
                raise
            self._requests[request_id] = request
            self.metrics.queue_depth.set(len(self.scheduler.waiting))
        self._wake.set()
        return request.queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            seq = self.scheduler.abort(request_id)
            self._requests.pop(request_id, None)
            if seq is not None:
                self.metrics.finished.labels(FinishReason.ABORT.value).inc()
        self._wake.set()

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                has_work = self.scheduler.has_work()
                if not has_work:
                    self._wake.clear()
            if not has_work:
                self._wake.wait(timeout=1.0)
                continue
            try:
                self.step()
            except Exception as exc:  # a failed step fails its requests, never the server
                logger.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(exc).__name__}")

    def step(self) -> None:
        started = time.monotonic()
        with self._lock:
            output = self.scheduler.schedule()
            self._record_schedule(output)
            # Slots are read under the lock: an abort may free them once it is released.
            items = [BatchItem(c.seq.slot, c.start, c.tokens, c.sample)
                     for c in output.chunks if c.seq.slot is not None]
        for slot, keep in output.kv_truncations:
            self.runner.truncate_slot(slot, keep)
        if not items:
            return
        logits = self.runner.decode(items)
        sampled: dict[str, int] = {}
        row = 0
        with self._lock:
            for chunk in output.chunks:
                if not chunk.sample:
                    continue
                request = self._requests.get(chunk.seq.request_id)
                if request is not None:
                    sampled[chunk.seq.request_id] = request.sampler.sample(logits[row])
                else:  # aborted while the step ran; its token is never used
                    sampled[chunk.seq.request_id] = -1
                row += 1
            self.scheduler.update_from_output(output, sampled)
            self._postprocess(output, sampled)
            self.metrics.queue_depth.set(len(self.scheduler.waiting))
            self.metrics.running.set(len(self.scheduler.running))
            self.metrics.kv_reserved.set(self.scheduler.kv_reserved)
        self.metrics.step_seconds.observe(time.monotonic() - started)

    def _record_schedule(self, output: SchedulerOutput) -> None:
        if output.chunks:
            self.metrics.sequences_per_step.observe(output.num_sequences)
            self.metrics.tokens_per_step.observe(output.num_tokens)
            self.metrics.prompt_tokens.inc(
                sum(len(c.tokens) for c in output.chunks if c.seq.is_prefilling))

    def _postprocess(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Request, EngineOutput]]] = {}
        now = time.monotonic()
        for chunk in output.chunks:
            seq = chunk.seq
            request = self._requests.get(seq.request_id)
            if request is None or not chunk.sample:
                continue
            self.metrics.generated_tokens.inc()
            if request.first_token_at is None:
                request.first_token_at = now
                self.metrics.cached_prompt_tokens.inc(seq.num_cached)
                self.metrics.time_to_first_token.observe(now - request.arrival)
            token = sampled[seq.request_id]
            text = "" if token in seq.eog_ids else request.detokenizer.add(token)
            text, stopped = request.stops.feed(text)
            if stopped and seq.finish_reason is None:
                self.scheduler.finish(seq, FinishReason.STOP)
            if seq.finish_reason is not None:
                if not stopped:
                    text += request.stops.feed(request.detokenizer.flush())[0]
                    text += request.stops.flush()
                self.metrics.finished.labels(seq.finish_reason.value).inc()
                del self._requests[seq.request_id]
            elif not text:
                continue
            result = EngineOutput(text, seq.num_prompt, seq.num_output, seq.num_cached,
                                  seq.finish_reason)
            deliveries.setdefault(request.loop, []).append((request, result))
        for loop, batch in deliveries.items():
            loop.call_soon_threadsafe(_deliver, batch)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            requests = list(self._requests.values())
            self._requests.clear()
            for request in requests:
                self.scheduler.abort(request.seq.request_id)
            # A failed decode may leave cells half written: start from an empty cache.
            self.scheduler.forget_cached_cells()
            self.runner.clear_all()
        for request in requests:
            output = EngineOutput("", request.seq.num_prompt, request.seq.num_output,
                                  error=message)
            request.loop.call_soon_threadsafe(request.queue.put_nowait, output)


def _deliver(batch: list[tuple[_Request, EngineOutput]]) -> None:
    for request, output in batch:
        request.queue.put_nowait(output)
