"""The engine loop: schedule -> run -> postprocess, on its own thread.

The event loop submits requests and reads their outputs through asyncio queues; the
engine thread owns the scheduler and the runner. Submits and aborts go through an inbox
the engine thread drains before each step, so the event loop never waits on a step (no
lock is held across one). `llama_decode` releases the GIL, so
HTTP work goes on while a step runs. A request with `n` choices is `n` sequences that
share the request's queue; the scheduler makes them read their prompt once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modelyard.engine.account_history import AccountHistories
from modelyard.engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from modelyard.engine.draw import verify
from modelyard.engine.fair_share import InterruptRule
from modelyard.engine.grammar import Constraint, GrammarCompiler, GrammarMatcher
from modelyard.engine.metrics import EngineMetrics
from modelyard.engine.runner import BatchItem, DecodeInterrupted, LlamaRunner
from modelyard.engine.sampling import Sample, Sampler, choice_rngs
from modelyard.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput
from modelyard.engine.sequence import (
    COMMON_SHARE,
    FinishReason,
    SamplingParams,
    Sequence,
    Share,
)
from modelyard.engine.speculation import PromptLookup
from modelyard.engine.state import EngineOutput, ReasoningTags, RequestState, SequenceState

__all__ = ["Engine", "EngineOutput", "ReasoningTags"]

logger = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the server is shutting down"
STOP_STEP_SECONDS = 30.0
"""How long `stop` waits, past the grace period, for the step in progress to end."""


@dataclass(frozen=True)
class _Submit:
    request: RequestState


@dataclass(frozen=True)
class _Abort:
    request: RequestState


@dataclass(frozen=True)
class _ClearCache:
    pass


class Engine:
    """The event-loop side (`submit`, `abort`) never waits on a step: it appends commands
    to an inbox the engine thread drains at the start of each step. Only the engine thread
    touches the scheduler, the runner and the sequences' state."""

    def __init__(self, runner: LlamaRunner, config: SchedulerConfig,
                 metrics: EngineMetrics | None = None,
                 grammar: GrammarCompiler | None = None) -> None:
        self.runner = runner
        self.grammar = grammar
        self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelyard-mask")
        self.scheduler = Scheduler(config)
        self.metrics = metrics or EngineMetrics()
        self._sequences: dict[str, SequenceState] = {}
        """Sequences queued or running, by sequence id (engine thread only)."""
        self._requests: dict[str, RequestState] = {}
        """Requests not yet ended: added by `submit`, removed by the engine thread."""
        self._inbox: deque[_Submit | _Abort | _ClearCache] = deque()
        self._count_lock = threading.Lock()
        """Guards the two counts below and `_closing`; never held across anything else."""
        self._inbox_sequences = 0
        self._waiting_sequences = 0
        """Sequences in the inbox, and in the scheduler's waiting queue as last seen."""
        self._closing = False
        self._close_deadline = 0.0
        self._wake = threading.Event()
        self._reported = (0, 0, 0)
        """Waiting and running sequences and reserved KV cells as last added to the gauges."""
        self._interrupt_lock = threading.Lock()
        self._interrupt_rule: InterruptRule | None = None
        """Whose request may interrupt the step in flight (fair share); guarded by the lock."""
        spec = config.speculation
        self._histories = (AccountHistories() if spec is not None and spec.account_history
                           else None)
        """Each account's recent outputs, drafted from (account_history.py)."""
        self._thread = threading.Thread(target=self._run, name="modelyard-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, let running ones finish for up to `grace_s` seconds, then
        end every request still queued or running with an error output, and stop."""
        with self._count_lock:
            self._closing = True
            self._close_deadline = time.monotonic() + grace_s
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=grace_s + STOP_STEP_SECONDS)
        if not self._thread.is_alive():  # never started, or done: what is left fails here
            self._drain()
            self._fail_all(SHUTDOWN_MESSAGE, reset_cache=False)
        self._mask_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def stopped(self) -> bool:
        """The engine thread is not running (so the runner may be closed)."""
        return not self._thread.is_alive()

    # -- the event-loop side ---------------------------------------------------------------

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               n: int = 1, *, constraint: Constraint | None = None,
               reasoning: ReasoningTags | None = None,
               cache_scope: str | None = None,
               share: Share = COMMON_SHARE) -> asyncio.Queue[EngineOutput]:
        """Queue a request with `n` choices; raises `QueueFullError` at once when full.

        `constraint` keeps the output inside a grammar; `reasoning` says the output starts
        inside a reasoning block whose length `params.thinking_budget` caps; prefix-cache
        cells are reused only between requests of the same `cache_scope`; slots and prefill
        are shared between accounts by their `share` (see fair_share.py)."""
        self._check_room(n)  # before any work: a full queue is refused cheaply
        ids = [request_id] if n == 1 else [f"{request_id}:{i}" for i in range(n)]
        seqs = [Sequence(seq_id, prompt_ids, params, eog_ids=self.runner.eog_ids,
                         cache_scope=cache_scope, share=share,
                         drafter=self._drafter(reasoning, params, share))
                for seq_id in ids]
        try:
            self.scheduler.check_fits(seqs)
        except ValueError:
            self.metrics.rejected.inc()
            raise
        request = RequestState(request_id, asyncio.Queue(), asyncio.get_running_loop())
        matchers: list[GrammarMatcher | None] = (
            list(self.grammar.matchers(constraint, n))
            if constraint is not None and self.grammar is not None else [None] * n)
        request.sequences = [
            SequenceState(index, seq, Sampler(params, prompt_ids, rng),
                          IncrementalDetokenizer(self.runner.token_bytes),
                          StopStringMatcher(params.stop), request, matcher, reasoning)
            for index, (seq, rng, matcher) in enumerate(
                zip(seqs, choice_rngs(params.seed, n), matchers, strict=True))
        ]
        with self._count_lock:
            self._check_room(n)
            self._inbox_sequences += n
            self._requests[request_id] = request
            self._inbox.append(_Submit(request))
        self._wake.set()
        if self._interrupt_rule is not None:  # read without the lock: checked again under it
            self._interrupt_for(share)
        return request.queue

    def _interrupt_for(self, share: Share) -> None:
        """Stop the step in flight if this account's request may interrupt it (a light
        account beside heavier ones, see `Scheduler.interrupt_rule`); the request is in
        the inbox already, so the next step starts it."""
        with self._interrupt_lock:
            rule = self._interrupt_rule
            if rule is not None and rule.interrupts_for(share.key, share.weight):
                self._interrupt_rule = None
                self.runner.interrupt()

    def _drafter(self, reasoning: ReasoningTags | None, params: SamplingParams,
                 share: Share) -> PromptLookup | None:
        """A sequence's drafter, when speculation is on and every draft can be verified
        exactly: not under a thinking budget (which forces tokens in the middle of a
        draft). Under a grammar each draft position is sampled under the mask of the
        grammar advanced past the drafts before it (`draw.verify`). It also drafts from the
        outputs of the request's account, if any, and of no other."""
        spec = self.scheduler.config.speculation
        if spec is None or (reasoning is not None and params.thinking_budget is not None):
            return None
        history = (self._histories.for_account(share.key) if self._histories is not None
                   else None)
        return PromptLookup(spec, history)

    def _check_room(self, n: int) -> None:
        if self._closing:
            self.metrics.rejected.inc()
            raise QueueFullError("the engine is shutting down")
        queued = self._inbox_sequences + self._waiting_sequences
        if queued + n > self.scheduler.config.max_waiting:
            self.metrics.rejected.inc()
            raise QueueFullError(f"{queued} sequences are already waiting")

    def abort(self, request_id: str) -> None:
        """End a request (its client went away); nothing more of it is delivered."""
        request = self._requests.get(request_id)
        if request is None:
            return
        request.aborted = True  # read by `_deliver`, on this same event loop
        self._inbox.append(_Abort(request))
        self._wake.set()

    def clear_prefix_cache(self) -> None:
        """Drop every cached prompt prefix (running sequences keep their cells)."""
        self._inbox.append(_ClearCache())
        self._wake.set()

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._drain()
            if self._closing and (not self.scheduler.has_work()
                                  or time.monotonic() >= self._close_deadline):
                return  # `stop` fails whatever is left
            if not self.scheduler.has_work():
                self._wake.clear()
                if not self._inbox:  # a command appended before the clear is not lost
                    self._wake.wait(timeout=1.0)
                continue
            try:
                self.step()
            except Exception as exc:  # a failed step fails its requests, never the server
                logger.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(exc).__name__}")

    def _drain(self) -> None:
        """Apply the commands the event loop queued, in order: O(commands)."""
        inbox = self._inbox
        if not inbox:
            return
        drained = 0
        while inbox:
            command = inbox.popleft()
            if isinstance(command, _Submit):
                drained += len(command.request.sequences)
                self._admit(command)
            elif isinstance(command, _Abort):
                self._abort(command.request)
            else:
                self.scheduler.drop_cached_cells()
        with self._count_lock:
            self._inbox_sequences -= drained
            self._waiting_sequences = len(self.scheduler.waiting)
        self._set_gauges()

    def _set_gauges(self) -> None:
        """Add this engine's change since it last reported to the gauges, which hold the
        sums over every engine sharing the metrics (one per local model)."""
        now = (len(self.scheduler.waiting), len(self.scheduler.running),
               self.scheduler.kv_reserved)
        gauges = (self.metrics.queue_depth, self.metrics.running, self.metrics.kv_reserved)
        for gauge, value, reported in zip(gauges, now, self._reported, strict=True):
            if value != reported:
                gauge.inc(value - reported)
        self._reported = now

    def _admit(self, command: _Submit) -> None:
        request = command.request
        if request.aborted:
            self._requests.pop(request.request_id, None)
            return
        try:
            self.scheduler.add_group([state.seq for state in request.sequences])
        except Exception as exc:  # submit checked the room; this is not expected
            logger.exception("a request could not be queued")
            self._requests.pop(request.request_id, None)
            _send(request.loop, [(request, EngineOutput(
                0, "", request.sequences[0].seq.num_prompt, 0,
                error=f"the request could not be queued: {type(exc).__name__}"))])
            return
        for state in request.sequences:
            self._sequences[state.seq_id] = state

    def _abort(self, request: RequestState) -> None:
        if self._requests.get(request.request_id) is request:
            del self._requests[request.request_id]
        for state in request.sequences:
            seq_id = state.seq_id
            if self._sequences.get(seq_id) is state:
                del self._sequences[seq_id]
                if self.scheduler.abort(seq_id):
                    self.metrics.finished.labels(FinishReason.ABORT.value).inc()

    def step(self) -> None:
        started = time.monotonic()
        output = self.scheduler.schedule()
        waiting = len(self.scheduler.waiting)
        if waiting != self._waiting_sequences:
            with self._count_lock:
                self._waiting_sequences = waiting
        self._record_schedule(output)
        items = [BatchItem(c.seq.slot, c.start, c.tokens, c.sample, 1 + c.num_draft)
                 for c in output.chunks if c.seq.slot is not None]
        for slot, keep in output.kv_truncations:
            self.runner.truncate_slot(slot, keep)
        for source, slot, n in output.kv_copies:
            self.runner.copy_prefix(source, slot, n)
        if not items:
            return
        rule = self.scheduler.interrupt_rule(output)
        if rule is not None:
            with self._interrupt_lock:
                self._interrupt_rule = rule
        try:
            logits = self.runner.decode(items)
        except DecodeInterrupted:
            self.scheduler.interrupted(output)
            self.metrics.interrupted_steps.inc()
            return
        finally:
            if rule is not None:
                with self._interrupt_lock:  # an interrupt that came too late is forgotten
                    self._interrupt_rule = None
                    self.runner.clear_interrupt()
        samples: dict[str, list[Sample]] = {}
        row = 0
        for chunk in output.chunks:
            if not chunk.sample:
                continue
            state = self._sequences.get(chunk.seq.seq_id)
            rows = logits[row:row + 1 + chunk.num_draft]
            samples[chunk.seq.seq_id] = (self._verify(state, rows, chunk.draft)
                                         if state is not None else [Sample(-1)])
            row += 1 + chunk.num_draft
        self.scheduler.update_from_output(
            output, {seq_id: [s.token for s in drawn] for seq_id, drawn in samples.items()})
        self._postprocess(output, samples)
        self._set_gauges()
        self.metrics.step_seconds.observe(time.monotonic() - started)

    def _verify(self, state: SequenceState, rows: npt.NDArray[np.float32],
                draft: list[int]) -> list[Sample]:
        """A chunk's tokens drawn and its drafts checked (draw.py), counted in the metrics."""
        drawn = verify(state, rows, draft, self._mask_pool)
        if draft:
            kept = next((i for i, (s, d) in enumerate(zip(drawn, draft, strict=False))
                         if s.token != d), min(len(drawn), len(draft)))
            self.metrics.draft_tokens.inc(len(draft))
            self.metrics.accepted_draft_tokens.inc(kept)
        return drawn

    def _record_schedule(self, output: SchedulerOutput) -> None:
        if output.chunks:
            self.metrics.sequences_per_step.observe(output.num_sequences)
            self.metrics.tokens_per_step.observe(output.num_tokens)
            self.metrics.prompt_tokens.inc(
                sum(len(c.tokens) for c in output.chunks if c.seq.is_prefilling))

    def _postprocess(self, output: SchedulerOutput, samples: dict[str, list[Sample]]) -> None:
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestState, EngineOutput]]] = {}
        now = time.monotonic()
        for chunk in output.chunks:
            seq = chunk.seq
            state = self._sequences.get(seq.seq_id)
            if state is None or not chunk.sample:
                continue
            drawn = samples[seq.seq_id]
            request = state.request
            if seq.num_output == len(drawn):  # its first tokens
                self.metrics.cached_prompt_tokens.inc(seq.num_cached)
                if request.first_token_at is None:
                    request.first_token_at = now
                    self.metrics.time_to_first_token.observe(now - request.arrival)
            result = self._advance(state, samples[seq.seq_id])
            if result is not None:
                deliveries.setdefault(request.loop, []).append((request, result))
        for loop, batch in deliveries.items():
            _send(loop, batch)

    def _advance(self, state: SequenceState, drawn: list[Sample]) -> EngineOutput | None:
        """Detokenize a sequence's new tokens one by one and check its stop strings; the
        output to send. A stop string found before the step's last token ends the
        sequence there: the tokens after it are dropped, never sent nor counted."""
        seq = state.seq
        text = ""
        stopped = False
        used = 0
        for sample in drawn:
            used += 1
            if sample.logprob is not None:
                state.pending_logprobs.append((sample.token, sample.logprob))
            piece = "" if sample.token in seq.eog_ids else state.detokenizer.add(sample.token)
            if state.reasoning is not None:
                state.text_tail = (state.text_tail + piece)[-64:]
                if state.reasoning.close_text in state.text_tail:
                    state.reasoning = None  # the model closed its reasoning block itself
            piece, stopped = state.stops.feed(piece)
            text += piece
            if stopped:
                break
        self.metrics.generated_tokens.inc(used)
        if used < len(drawn):
            self._drop_tail(seq, len(drawn) - used)
        # `grammar_done` is the grammar's state after the last token drawn (draw.verify
        # ends the walk where the grammar completes), so it ends the sequence here.
        if (state.grammar_done or stopped) and seq.finish_reason is None:
            self.scheduler.finish(seq, FinishReason.STOP)
        if stopped and seq.params.include_stop_str_in_output:
            text += state.stops.matched or ""
        if seq.finish_reason is not None:
            if seq.drafter is not None and seq.drafter.history is not None:
                seq.drafter.history.add(seq.output_ids)  # an output that ended whole
            if not stopped:
                text += state.stops.feed(state.detokenizer.flush())[0]
                text += state.stops.flush()
            self.metrics.finished.labels(seq.finish_reason.value).inc()
            del self._sequences[seq.seq_id]
            if all(other.seq_id not in self._sequences for other in state.request.sequences):
                self._requests.pop(state.request.request_id, None)
        elif not text:
            return None
        logprobs, state.pending_logprobs = tuple(state.pending_logprobs), []
        return EngineOutput(state.index, text, seq.num_prompt, seq.num_output, seq.num_cached,
                            seq.finish_reason, logprobs=logprobs,
                            num_reasoning_tokens=state.reasoning_tokens)

    def _drop_tail(self, seq: Sequence, n: int) -> None:
        """Forget a sequence's last `n` tokens (kept drafts after its stop string): it ends
        where decoding one token at a time would have ended it."""
        del seq.token_ids[-n:]
        seq.num_computed = min(seq.num_computed, len(seq.token_ids))
        if seq.finish_reason is not None:
            seq.finish_reason = FinishReason.STOP  # the stop string came first

    def _fail_all(self, message: str, *, reset_cache: bool = True) -> None:
        """End every queued and running request with an error output (engine thread, or
        `stop` once that thread is gone)."""
        states = list(self._sequences.values())
        self._sequences.clear()
        for state in states:
            self.scheduler.abort(state.seq.seq_id)
            request = state.request
            if self._requests.get(request.request_id) is request:
                del self._requests[request.request_id]
        with self._count_lock:
            self._waiting_sequences = len(self.scheduler.waiting)
        self._set_gauges()
        if reset_cache:
            # A failed decode may leave cells half written: start from an empty cache.
            self.scheduler.forget_cached_cells()
            self.runner.clear_all()
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestState, EngineOutput]]] = {}
        for state in states:
            seq = state.seq
            output = EngineOutput(state.index, "", seq.num_prompt, seq.num_output,
                                  error=message)
            deliveries.setdefault(state.request.loop, []).append((state.request, output))
        for loop, batch in deliveries.items():
            _send(loop, batch)


def _send(loop: asyncio.AbstractEventLoop, batch: list[tuple[RequestState, EngineOutput]]) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody reads these outputs
        loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[RequestState, EngineOutput]]) -> None:
    """On the request's event loop: an aborted request's outputs are dropped here, so
    none reaches its queue after `abort` returned."""
    for request, output in batch:
        if not request.aborted:
            request.queue.put_nowait(output)
