"""The continuous-batching scheduler: a pure state machine, no llama.cpp and no threads.

Each engine step asks `schedule()` what to feed to one `llama_decode` call, runs it,
and reports the sampled tokens back with `update_from_output()`. A step holds:

1. the next token of every running sequence that is past its prompt (decode), then
2. prefill chunks of running sequences still reading their prompt, then
3. the start of the prompts of waiting sequences, admitted while a slot is free and
   the KV cache can hold their whole reservation (prompt + max_tokens),

all within `step_token_budget` tokens, so a long prompt is read a chunk per step and never
stalls the sequences already decoding (chunked prefill).

A slot keeps the KV cells of the sequence that last held it. A new sequence goes to the
free slot whose cells share the longest prefix with its prompt and starts reading after
that prefix (a repeated system prompt is read once); with no shared prefix it takes the
slot freed longest ago, so recently used prefixes live longest. Cached cells give way,
oldest first, when an admission needs their room in the KV cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from modelyard.engine.sequence import FinishReason, Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_sequences: int
    step_token_budget: int
    kv_capacity: int
    """KV cells in the shared cache, across all sequences."""
    context_per_sequence: int
    max_waiting: int
    prefix_caching: bool = True


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int
    """Position of the first token of `tokens` in the sequence."""
    tokens: list[int]
    sample: bool
    """Whether this chunk reaches the end of the sequence, so its last logits are sampled."""


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    kv_truncations: list[tuple[int, int]] = field(default_factory=list)
    """(slot, keep): drop the slot's KV cells from position `keep` on, before the batch runs."""

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.tokens) for chunk in self.chunks)

    @property
    def num_sequences(self) -> int:
        return len(self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        if config.step_token_budget < config.max_sequences:
            raise ValueError("step_token_budget must be at least max_sequences")
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots: list[int] = list(range(config.max_sequences))
        """Free slots, the one freed longest ago first."""
        self._slot_cache: dict[int, list[int]] = {}
        """Tokens whose KV cells a free slot still holds, from position 0."""
        self._slot_cells: dict[int, int] = {}
        """KV cells a slot may hold, at most: more than its sequence computed when it was
        aborted while a step ran, since that step's chunk wrote cells the scheduler ignores."""
        self._truncations: list[tuple[int, int]] = []
        self._kv_reserved = 0

    # -- requests in and out -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.kv_reservation > min(self.config.kv_capacity, self.config.context_per_sequence):
            raise ValueError(
                f"sequence needs {seq.kv_reservation} KV cells, more than one sequence may hold"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request wherever it is (client gone); its slot is free for the next step."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._mark_finished(seq, FinishReason.ABORT)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a running sequence (a stop string found by the caller, or an abort)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self.running.remove(seq)
        self._kv_reserved -= seq.kv_reservation
        if seq.slot is not None:
            if self.config.prefix_caching:
                self._slot_cache[seq.slot] = seq.token_ids[: seq.num_computed]
            else:
                self._truncations.append((seq.slot, 0))
                self._slot_cells[seq.slot] = 0
            self._free_slots.append(seq.slot)
            seq.slot = None
        self._mark_finished(seq, reason)

    def forget_cached_cells(self) -> None:
        """The KV cache was cleared outside the scheduler: no free slot holds cells now."""
        self._slot_cache.clear()
        self._slot_cells = {seq.slot: 0 for seq in self.running if seq.slot is not None}
        self._truncations.clear()

    @staticmethod
    def _mark_finished(seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- the step -------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._truncations)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.step_token_budget
        for seq in self.running:
            if not seq.is_prefilling:
                output.chunks.append(ScheduledChunk(seq, seq.num_computed,
                                                    seq.token_ids[seq.num_computed:], True))
                budget -= len(output.chunks[-1].tokens)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.is_prefilling:
                budget -= self._add_prefill(output, seq, budget)
        while budget > 0 and self.waiting and self._can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self._assign_slot(seq)
            seq.status = SequenceStatus.RUNNING
            self._kv_reserved += seq.kv_reservation
            self.running.append(seq)
            budget -= self._add_prefill(output, seq, budget)
        for chunk in output.chunks:
            if chunk.seq.slot is not None:
                self._slot_cells[chunk.seq.slot] = chunk.start + len(chunk.tokens)
        # Truncations from finished sequences and from this step's admissions both run
        # before this step's batch.
        output.kv_truncations, self._truncations = self._truncations, []
        return output

    def _can_admit(self, seq: Sequence) -> bool:
        return bool(self._free_slots) and (
            self._kv_reserved + seq.kv_reservation <= self.config.kv_capacity
        )

    def _assign_slot(self, seq: Sequence) -> None:
        best_slot, best = self._free_slots[0], 0
        for slot in self._free_slots:
            shared = _common_prefix(self._slot_cache.get(slot, ()), seq.prompt_ids)
            if shared > best:
                best_slot, best = slot, shared
        # Always read at least the last prompt token: its logits give the first sample.
        reused = min(best, seq.num_prompt - 1)
        self._free_slots.remove(best_slot)
        self._slot_cache.pop(best_slot, None)
        if self._slot_cells.get(best_slot, 0) > reused:
            self._truncations.append((best_slot, reused))
        self._slot_cells[best_slot] = reused
        self._make_room(seq.kv_reservation)
        seq.slot = best_slot
        seq.num_computed = seq.num_cached = reused

    def _make_room(self, reservation: int) -> None:
        """Clear free slots' cached cells, the slot freed longest ago first, until the KV
        cache holds them next to every reservation, the one being admitted included."""
        excess = (self._kv_reserved + reservation - self.config.kv_capacity
                  + sum(self._slot_cells.get(slot, 0) for slot in self._free_slots))
        for slot in self._free_slots:
            if excess <= 0:
                break
            cells = self._slot_cells.get(slot, 0)
            if cells:
                self._truncations.append((slot, 0))
                self._slot_cells[slot] = 0
                self._slot_cache.pop(slot, None)
                excess -= cells

    @staticmethod
    def _add_prefill(output: SchedulerOutput, seq: Sequence, budget: int) -> int:
        remaining = len(seq.token_ids) - seq.num_computed
        n = min(budget, remaining)
        end = seq.num_computed + n
        output.chunks.append(
            ScheduledChunk(seq, seq.num_computed, seq.token_ids[seq.num_computed:end],
                           end == len(seq.token_ids))
        )
        return n

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, int]
    ) -> list[Sequence]:
        """Record what the step computed and sampled; return the sequences it finished.

        `sampled` maps request id to the token drawn for every chunk with `sample` set.
        """
        finished: list[Sequence] = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed = chunk.start + len(chunk.tokens)
            if not chunk.sample:
                continue
            token = sampled[seq.request_id]
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.eog_ids:
            return FinishReason.STOP
        if seq.num_output >= seq.params.max_tokens:
            return FinishReason.LENGTH
        if len(seq.token_ids) >= self.config.context_per_sequence:
            return FinishReason.LENGTH
        return None

    @property
    def kv_reserved(self) -> int:
        return self._kv_reserved


def _common_prefix(a: Seq[int], b: Seq[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
