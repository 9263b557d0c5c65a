"""The engine loop: schedule -> run -> postprocess, on its own thread.

The event loop submits requests and reads their outputs through asyncio queues; the
engine thread owns the scheduler and the runner. `llama_decode` releases the GIL, so
HTTP work goes on while a step runs. A request with `n` choices is `n` sequences that
share the request's queue; the scheduler makes them read their prompt once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from modelyard.engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from modelyard.engine.grammar import Constraint, GrammarCompiler, GrammarMatcher
from modelyard.engine.metrics import EngineMetrics
from modelyard.engine.runner import BatchItem, LlamaRunner
from modelyard.engine.sampling import Sample, Sampler, TokenLogprob
from modelyard.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from modelyard.engine.sequence import FinishReason, SamplingParams, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOutput:
    """New text of one choice since its last output, and its end when it has ended."""

    index: int
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: tuple[tuple[int, TokenLogprob], ...] = ()
    """(token id, its logprobs) for the tokens behind this output's text."""
    num_reasoning_tokens: int = 0


@dataclass(eq=False)
class _Request:
    request_id: str
    sequence_ids: list[str]
    queue: asyncio.Queue[EngineOutput]
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


@dataclass(frozen=True)
class ReasoningTags:
    """How a model marks its reasoning: the closing tag's text and its token ids."""

    close_text: str
    close_ids: tuple[int, ...]


@dataclass(eq=False)
class _Choice:
    index: int
    seq: Sequence
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    request: _Request
    matcher: GrammarMatcher | None = None
    reasoning: ReasoningTags | None = None
    """Set while the choice is inside a reasoning block with a thinking budget."""
    reasoning_tokens: int = 0
    forced: list[int] = field(default_factory=list)
    """Tokens the engine appends instead of sampling (closing a reasoning block)."""
    answer_due: bool = False
    grammar_done: bool = False
    pending_logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    text_tail: str = ""


class Engine:
    def __init__(self, runner: LlamaRunner, config: SchedulerConfig,
                 metrics: EngineMetrics | None = None,
                 grammar: GrammarCompiler | None = None) -> None:
        self.runner = runner
        self.grammar = grammar
        self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelyard-mask")
        self.scheduler = Scheduler(config)
        self.metrics = metrics or EngineMetrics()
        self._choices: dict[str, _Choice] = {}
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
        self._mask_pool.shutdown(wait=False, cancel_futures=True)

    # -- the event-loop side ---------------------------------------------------------------

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               n: int = 1, *, constraint: Constraint | None = None,
               reasoning: ReasoningTags | None = None) -> asyncio.Queue[EngineOutput]:
        """Queue a request with `n` choices; raises `QueueFullError` at once when full.

        `constraint` keeps the output inside a grammar; `reasoning` says the output starts
        inside a reasoning block whose length `params.thinking_budget` caps."""
        ids = [request_id] if n == 1 else [f"{request_id}:{i}" for i in range(n)]
        request = _Request(request_id, ids, asyncio.Queue(), asyncio.get_running_loop())
        if params.seed is not None and n > 1:  # independent but reproducible streams
            rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(params.seed).spawn(n)]
        else:
            rngs = [np.random.default_rng(params.seed) for _ in range(n)]
        choices = [
            _Choice(index, Sequence(seq_id, prompt_ids, params, eog_ids=self.runner.eog_ids),
                    Sampler(params, prompt_ids, rng),
                    IncrementalDetokenizer(self.runner.token_bytes),
                    StopStringMatcher(params.stop), request)
            for index, (seq_id, rng) in enumerate(zip(ids, rngs, strict=True))
        ]
        for choice in choices:
            if constraint is not None and self.grammar is not None:
                choice.matcher = self.grammar.matcher(constraint)
            choice.reasoning = reasoning
        with self._lock:
            try:
                self.scheduler.add_group([choice.seq for choice in choices])
            except Exception:
                self.metrics.rejected.inc()
                raise
            self._requests[request_id] = request
            for choice in choices:
                self._choices[choice.seq.request_id] = choice
            self.metrics.queue_depth.set(len(self.scheduler.waiting))
        self._wake.set()
        return request.queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            request = self._requests.pop(request_id, None)
            for seq_id in request.sequence_ids if request else ():
                if self._choices.pop(seq_id, None) is not None and self.scheduler.abort(seq_id):
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
        for source, slot, n in output.kv_copies:
            self.runner.copy_prefix(source, slot, n)
        if not items:
            return
        logits = self.runner.decode(items)
        samples: dict[str, Sample] = {}
        row = 0
        with self._lock:
            for chunk in output.chunks:
                if not chunk.sample:
                    continue
                choice = self._choices.get(chunk.seq.request_id)
                # An aborted choice's token is never used.
                samples[chunk.seq.request_id] = (self._sample(choice, logits[row])
                                                 if choice is not None else Sample(-1))
                row += 1
            self.scheduler.update_from_output(
                output, {seq_id: sample.token for seq_id, sample in samples.items()})
            self._postprocess(output, samples)
            self.metrics.queue_depth.set(len(self.scheduler.waiting))
            self.metrics.running.set(len(self.scheduler.running))
            self.metrics.kv_reserved.set(self.scheduler.kv_reserved)
        self.metrics.step_seconds.observe(time.monotonic() - started)

    def _sample(self, choice: _Choice, logits: np.ndarray[tuple[int], np.dtype[np.float32]]
                ) -> Sample:
        if choice.forced:
            token = choice.forced.pop(0)
            choice.answer_due = not choice.forced
            return Sample(token)
        matcher = choice.matcher
        allowed = matcher.allowed() if matcher is not None and matcher.active else None
        if choice.answer_due:  # right after a closed reasoning block, the answer must begin
            choice.answer_due = False
            allowed = _without(allowed, choice.seq.eog_ids, logits.shape[0])
        sample = choice.sampler.sample(logits, allowed)
        if matcher is not None:
            matcher.consume(sample.token)
            # Read the grammar's state before the next mask starts computing on its thread.
            choice.grammar_done = matcher.done
            if not choice.grammar_done:
                matcher.prefetch(self._mask_pool)
        if choice.reasoning is not None:
            choice.reasoning_tokens += 1  # the closing tag, forced or not, is not counted
            budget = choice.seq.params.thinking_budget
            if budget is not None and choice.reasoning_tokens >= budget:
                # At the budget the engine closes the block itself; the answer follows.
                choice.forced = list(choice.reasoning.close_ids)
                choice.reasoning = None
        return sample

    def _record_schedule(self, output: SchedulerOutput) -> None:
        if output.chunks:
            self.metrics.sequences_per_step.observe(output.num_sequences)
            self.metrics.tokens_per_step.observe(output.num_tokens)
            self.metrics.prompt_tokens.inc(
                sum(len(c.tokens) for c in output.chunks if c.seq.is_prefilling))

    def _postprocess(self, output: SchedulerOutput, samples: dict[str, Sample]) -> None:
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Request, EngineOutput]]] = {}
        now = time.monotonic()
        for chunk in output.chunks:
            seq = chunk.seq
            choice = self._choices.get(seq.request_id)
            if choice is None or not chunk.sample:
                continue
            self.metrics.generated_tokens.inc()
            request = choice.request
            if seq.num_output == 1:
                self.metrics.cached_prompt_tokens.inc(seq.num_cached)
                if request.first_token_at is None:
                    request.first_token_at = now
                    self.metrics.time_to_first_token.observe(now - request.arrival)
            result = self._advance(choice, samples[seq.request_id])
            if result is not None:
                deliveries.setdefault(request.loop, []).append((request, result))
        for loop, batch in deliveries.items():
            loop.call_soon_threadsafe(_deliver, batch)

    def _advance(self, choice: _Choice, sample: Sample) -> EngineOutput | None:
        """Detokenize a choice's new token and check its stop strings; the output to send."""
        seq = choice.seq
        if sample.logprob is not None:
            choice.pending_logprobs.append((sample.token, sample.logprob))
        text = "" if sample.token in seq.eog_ids else choice.detokenizer.add(sample.token)
        if choice.reasoning is not None:
            choice.text_tail = (choice.text_tail + text)[-64:]
            if choice.reasoning.close_text in choice.text_tail:
                choice.reasoning = None  # the model closed its reasoning block itself
        if choice.grammar_done and seq.finish_reason is None:
            self.scheduler.finish(seq, FinishReason.STOP)
        text, stopped = choice.stops.feed(text)
        if stopped and seq.finish_reason is None:
            self.scheduler.finish(seq, FinishReason.STOP)
        if stopped and seq.params.include_stop_str_in_output:
            text += choice.stops.matched or ""
        if seq.finish_reason is not None:
            if not stopped:
                text += choice.stops.feed(choice.detokenizer.flush())[0]
                text += choice.stops.flush()
            self.metrics.finished.labels(seq.finish_reason.value).inc()
            del self._choices[seq.request_id]
            if all(seq_id not in self._choices for seq_id in choice.request.sequence_ids):
                self._requests.pop(choice.request.request_id, None)
        elif not text:
            return None
        logprobs, choice.pending_logprobs = tuple(choice.pending_logprobs), []
        return EngineOutput(choice.index, text, seq.num_prompt, seq.num_output, seq.num_cached,
                            seq.finish_reason, logprobs=logprobs,
                            num_reasoning_tokens=choice.reasoning_tokens)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            choices = list(self._choices.values())
            self._choices.clear()
            self._requests.clear()
            for choice in choices:
                self.scheduler.abort(choice.seq.request_id)
            # A failed decode may leave cells half written: start from an empty cache.
            self.scheduler.forget_cached_cells()
            self.runner.clear_all()
        for choice in choices:
            seq = choice.seq
            output = EngineOutput(choice.index, "", seq.num_prompt, seq.num_output,
                                  error=message)
            choice.request.loop.call_soon_threadsafe(choice.request.queue.put_nowait, output)


def _without(allowed: npt.NDArray[np.bool_] | None, banned: frozenset[int],
             n_vocab: int) -> npt.NDArray[np.bool_]:
    mask = np.ones(n_vocab, dtype=np.bool_) if allowed is None else allowed.copy()
    mask[list(banned)] = False
    return mask


def _deliver(batch: list[tuple[_Request, EngineOutput]]) -> None:
    for request, output in batch:
        request.queue.put_nowait(output)
