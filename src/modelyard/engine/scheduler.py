"""The continuous-batching scheduler: a pure state machine, no llama.cpp and no threads.

Each engine step asks `schedule()` what to feed to one `llama_decode` call, runs it,
and reports the sampled tokens back with `update_from_output()`. A step holds:

1. the next token of every running sequence that is past its prompt (decode), then
2. prefill chunks of running sequences still reading their prompt, then
3. the start of the prompts of waiting sequences, admitted while a slot is free and
   the KV cache can hold their whole reservation (prompt + max_tokens),

all within `step_token_budget` tokens, so a long prompt is read a chunk per step and never
stalls the sequences already decoding (chunked prefill).

Fair share: the prefill chunks (2, 3) and the free slots go to accounts by weighted fair
queuing, not by arrival order (fair_share.py): each step the account with the least service
for its weight goes next, its prompts still being read first, then its waiting sequences in
the order it sent them. Running sequences are never preempted. While several accounts are
active, one holding fewer slots than its weight's share (a light one, e.g. an interactive
user beside another's batch job) gets steps of its own: a step that reads its prompt
(its turn by fair queuing, or its prompt's last token, which goes at once) reads no prompt
of an account at or above its share, so it costs about a decode step, not a prefill step
(the others' prompts wait a step). With `pause_heavy_every` set, such a step also leaves
out the decoding of the accounts above their share: they are paused for that step (no KV
dropped, no charge for it), so the light prompt is read nearly as fast as on an idle
engine. That trades the heavy accounts' throughput for the light ones' first token; it is
bounded by a credit of one step in `pause_heavy_every` (at most `PAUSE_BURST` in a row), so
however many light requests come, a heavy account keeps at least (N-1)/N of its decode
steps. `reserved_slots` keeps a free slot for a light account's next request, and
`heavy_prefill_per_step` caps the prompt tokens a step reads for the accounts at or above
their share while another account is about, so the step a light request waits for is
short. What is left of a light account's wait is the step in flight when it comes; with
`interrupt_heavy_steps` the engine stops that step (`interrupt_rule`, `interrupted`).

Prefix caching: a slot keeps the KV cells of the sequence that last held it. A new
sequence starts reading its prompt after the longest prefix it shares with either a free
slot's cells (it then takes that slot, unless that would drop many cells past the shared
prefix: then another free slot gets a copy of it, see `SlotCache.allocate`) or a running
sequence's computed prompt (its slot then gets a copy of those cells); a repeated
system prompt is read once. A sequence whose prompt shares at least `SHARE_MIN_TOKENS`
more with a prompt still being read waits for that reading to finish instead of doing it
twice; this is also how the `n` choices of one request read their prompt once. With no
shared prefix a sequence takes the slot freed longest ago, so recently used prefixes live
longest. Cached cells give way, oldest first, when an admission needs their room.

Every sequence has a cache scope (e.g. its account): cells are reused, copied or waited
for only between sequences of the same scope, so one tenant can neither read another's
prompts through `cached_tokens` nor time them. The scope None is shared by all.

A prompt's last token is read in a chunk of its own, in the step after the rest of the
prompt (see `SchedulerConfig.last_prompt_token_alone`).

The scheduler decides who runs and what each step reads; which slot holds which KV cells,
the reservations and the truncations and copies to apply live in `SlotCache`
(slot_cache.py), which it asks. Its configuration and the step it hands the engine are in
plan.py.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from modelyard.engine.drafts import add_drafts, record_drafts
from modelyard.engine.fair_share import SLOT_STEP_COST, FairQueue, Flow, InterruptRule
from modelyard.engine.plan import ScheduledChunk, SchedulerConfig, SchedulerOutput
from modelyard.engine.sequence import FinishReason, Sequence, SequenceStatus
from modelyard.engine.slot_cache import SlotCache, common_prefix
from modelyard.errors import ModelyardError

SHARE_MIN_TOKENS = 32
"""Prompt tokens worth waiting for another sequence to compute instead of reading them."""
PAUSE_BURST = 2.0
"""Steps in a row that may pause the accounts above their share (`pause_heavy_every`)."""
WAITING_SCAN = 64
"""Waiting sequences of an account looked at per step when earlier ones wait for a shared
prefix."""

__all__ = ["PAUSE_BURST", "SHARE_MIN_TOKENS", "WAITING_SCAN", "QueueFullError",
           "ScheduledChunk", "Scheduler", "SchedulerConfig", "SchedulerOutput"]


class QueueFullError(ModelyardError, RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        if config.step_token_budget < config.max_sequences:
            raise ValueError("step_token_budget must be at least max_sequences")
        self.config = config
        self.waiting = FairQueue(config.fair_share)
        """The waiting sequences (in arrival order when iterated), one queue per account."""
        self.running: list[Sequence] = []
        self.slots = SlotCache(config.max_sequences, config.kv_capacity,
                               prefix_caching=config.prefix_caching,
                               max_cached_cells=config.max_cached_cells,
                               low_slots_first=config.low_slots_first,
                               min_copy_tokens=config.min_copy_tokens)
        """Which slot holds which KV cells; the scheduler asks it for room and slots."""
        self._pause_credit = PAUSE_BURST
        """Steps that may still pause the accounts above their share (`_pause_heavy`)."""
        self.paused_steps = 0
        """Steps that left out the decoding of accounts above their share."""
        self._interrupt_credit = 1.0
        """Steps that may still be interrupted for a light account (`interrupt_rule`)."""
        self.interrupted_steps = 0
        self._service_before: dict[Flow, float] = {}
        self._step_paused = False

    # -- requests in and out -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.add_group([seq])

    def check_fits(self, seqs: list[Sequence]) -> None:
        """Raise ValueError if a sequence could never be admitted (reads the config only,
        so any thread may call it)."""
        for seq in seqs:
            if seq.kv_reservation > min(self.config.kv_capacity,
                                        self.config.context_per_sequence):
                raise ValueError(f"sequence needs {seq.kv_reservation} KV cells, more than "
                                 f"one sequence may hold")

    def add_group(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (the choices of one request): all of them or none."""
        self.check_fits(seqs)
        if len(self.waiting) + len(seqs) > self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} sequences are already waiting")
        for seq in seqs:
            seq.status = SequenceStatus.WAITING
            self.waiting.push(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        """Finish a sequence wherever it is (client gone); its slot is free for the next step."""
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                self._mark_finished(seq, FinishReason.ABORT)
                return seq
        for seq in self.running:
            if seq.seq_id == seq_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a running sequence (a stop string found by the caller, or an abort)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self.running.remove(seq)
        self.waiting.ended(seq)
        self.slots.release(seq.slot, seq.kv_reservation, seq.token_ids, seq.num_computed,
                           seq.cache_scope)
        seq.slot = None
        self._mark_finished(seq, reason)

    def forget_cached_cells(self) -> None:
        """The KV cache was cleared outside the scheduler: no free slot holds cells now."""
        self.slots.forget(seq.slot for seq in self.running if seq.slot is not None)

    def drop_cached_cells(self) -> None:
        """Clear every free slot's cells (the prefix cache) before the next step."""
        self.slots.drop_cached()

    @staticmethod
    def _mark_finished(seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- the step -------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.slots.has_pending())

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.step_token_budget
        fair = self.waiting
        if self.config.interrupt_heavy_steps:   # for `interrupted`
            self._service_before = dict(fair.service)
        self._step_paused = False
        fair.tick()
        prefilling: dict[Flow, deque[Sequence]] = {}
        for seq in self.running:
            fair.charge(seq, SLOT_STEP_COST)  # its slot, for this step
            if seq.is_prefilling:
                prefilling.setdefault(fair.key(seq), deque()).append(seq)
            else:
                output.chunks.append(ScheduledChunk(seq, seq.num_computed,
                                                    seq.token_ids[seq.num_computed:], True))
                budget -= len(output.chunks[-1].tokens)
        if self.config.speculation is not None and output.chunks:
            budget -= add_drafts(output, budget, self.config)
        self._fill(output, budget, prefilling)
        for chunk in output.chunks:
            if chunk.seq.slot is not None:
                self.slots.written(chunk.seq.slot, chunk.start + len(chunk.tokens))
        # Truncations from finished sequences and from this step's admissions both run
        # before this step's batch.
        output.kv_truncations, output.kv_copies = self.slots.take_pending()
        return output

    def _fill(self, output: SchedulerOutput, budget: int,
              prefilling: dict[Flow, deque[Sequence]]) -> None:
        """Give the rest of the budget away in prefill chunks (see `_give`). With fair
        share, the accounts holding fewer than their share of slots while others are
        active (light ones) go first, and a step that reads a light account's prompt reads
        no other account's: it costs about a decode step, not a prefill step. It may also
        leave out the decoding of accounts above their share (`pause_heavy_every`)."""
        fair = self.waiting
        every = self.config.pause_heavy_every
        if every > 0:
            self._pause_credit = min(PAUSE_BURST, self._pause_credit + 1 / every)
            self._interrupt_credit = min(1.0, self._interrupt_credit + 1 / every)
        heads = fair.heads(WAITING_SCAN)
        light = fair.light(self.config.max_sequences)
        if light and self._light_step(light, prefilling, heads):
            decodes = len(output.chunks)
            if self._give(output, budget,
                          {flow: seqs for flow, seqs in prefilling.items() if flow in light},
                          {flow: seqs for flow, seqs in heads.items() if flow in light}):
                self._pause_heavy(output, decodes, light)
                return
        capped: frozenset[Flow] = frozenset()
        if self.config.heavy_prefill_per_step > 0:
            capped = frozenset(flow for flow in {*prefilling, *heads}
                               if flow not in light and fair.others_active_lately(flow))
        self._give(output, budget, prefilling, heads, capped)

    def _light_step(self, light: set[Flow], prefilling: dict[Flow, deque[Sequence]],
                    heads: dict[Flow, deque[Sequence]]) -> bool:
        """Whether this step belongs to the light accounts: one of them is next by fair
        queuing, or one of their prompts is down to its last token (one token, read at
        once whatever the account's service: the first sample waits for it)."""
        flows = [flow for flow, seqs in prefilling.items() if seqs]
        flows += [flow for flow in heads if not prefilling.get(flow)]
        if flows and min(flows, key=self.waiting.turn) in light:
            return True
        return any(seq.num_computed == seq.num_prompt - 1
                   for flow in light for seq in prefilling.get(flow, ()))

    def _pause_heavy(self, output: SchedulerOutput, decodes: int, light: set[Flow]) -> None:
        """Leave the decoding of the accounts above their share of slots (but the `light`
        ones, whose step it is) out of this step (its first `decodes` chunks), if the pause
        credit allows: they are paused for the step, nothing is dropped."""
        if self.config.pause_heavy_every <= 0 or self._pause_credit < 1:
            return
        heavy = self.waiting.heavy(self.config.max_sequences) - light
        key = self.waiting.key
        kept = [chunk for i, chunk in enumerate(output.chunks)
                if i >= decodes or key(chunk.seq) not in heavy]
        if len(kept) < len(output.chunks):
            for chunk in output.chunks[:decodes]:
                if key(chunk.seq) in heavy:   # not served this step: no charge for it
                    self.waiting.charge(chunk.seq, -SLOT_STEP_COST)
            output.chunks[:] = kept
            self._pause_credit -= 1
            self.paused_steps += 1
            self._step_paused = True

    def interrupt_rule(self, output: SchedulerOutput) -> InterruptRule | None:
        """Whose request may interrupt this step while it runs (see `InterruptRule`); None
        when none may: interrupts off or spent for now, or no free slot to start it in."""
        config = self.config
        if not (config.interrupt_heavy_steps and config.pause_heavy_every > 0
                and self._interrupt_credit >= 1 and self.slots.free_slots and output.chunks):
            return None
        key = self.waiting.key
        return self.waiting.interrupt_rule(
            config.max_sequences, frozenset(key(c.seq) for c in output.chunks),
            frozenset(key(c.seq) for c in output.chunks if c.seq.is_prefilling))

    def interrupted(self, output: SchedulerOutput) -> None:
        """This step's decode was stopped before it finished (`interrupt_rule`): nothing of
        it was computed, so its sequences stay where they were (their next step reads the
        same tokens), its charges are taken back and an interrupt credit is spent. The
        admissions, copies and truncations it made stand."""
        for chunk in output.chunks:
            if chunk.seq.slot is not None:
                self.slots.written(chunk.seq.slot, chunk.start)
        self.waiting.restore_service(self._service_before)
        if self._step_paused:
            self._pause_credit += 1
            self.paused_steps -= 1
        self._interrupt_credit -= 1
        self.interrupted_steps += 1

    def _give(self, output: SchedulerOutput, budget: int,
              prefilling: dict[Flow, deque[Sequence]],
              heads: dict[Flow, deque[Sequence]],
              capped: frozenset[Flow] = frozenset()) -> int:
        """Give `budget` away a prefill chunk at a time, each to the account whose turn it
        is: a prompt it is still reading, else its next waiting sequence if a slot and the
        KV room are free. When the sequence whose turn it is does not fit, nobody is
        admitted past it. The `capped` accounts get `heavy_prefill_per_step` tokens at
        most, together. Returns the tokens given."""
        fair = self.waiting
        given = 0
        capped_left = self.config.heavy_prefill_per_step
        admitting = True
        while given < budget:
            flows = [flow for flow, seqs in prefilling.items() if seqs]
            if admitting:
                flows += [flow for flow in heads if not prefilling.get(flow)]
            if capped and capped_left <= 0:
                flows = [flow for flow in flows if flow not in capped]
            if not flows:
                break
            flow = min(flows, key=fair.turn)
            room = budget - given
            if flow in capped:
                room = min(room, capped_left)
            reading = prefilling.get(flow)
            if reading:
                seq = reading.popleft()
                n = self._add_prefill(output, seq, room)
                fair.charge(seq, n)
                given += n
                capped_left -= n if flow in capped else 0
                continue
            waiting = heads[flow]
            if self._keeps_reserve(flow):
                waiting.clear()   # not this account's turn for what is left
            while waiting:
                seq = waiting[0]
                if not self._can_admit(seq):
                    admitting = False
                    break
                waiting.popleft()
                reused, source = self._best_prefix(seq)
                if self._should_wait(seq, reused):
                    continue
                self._admit(seq, reused, source)
                n = self._add_prefill(output, seq, room)
                fair.charge(seq, SLOT_STEP_COST + n)
                given += n
                capped_left -= n if flow in capped else 0
                break
            if not waiting:
                del heads[flow]
        return given

    def _keeps_reserve(self, flow: Flow) -> bool:
        """Whether `flow` must leave the free slots left to other accounts: it holds one
        or more and at least its share of the slots among the accounts active lately."""
        reserve = self.config.reserved_slots
        held = self.waiting.held.get(flow, 0)
        return (reserve > 0 and self.config.fair_share
                and len(self.slots.free_slots) <= reserve
                and held > 0
                and held >= self.waiting.fair_slots(flow, self.config.max_sequences,
                                                    lately=True)
                and self.waiting.others_active_lately(flow))

    def _admit(self, seq: Sequence, reused: int, source: tuple[str, int]) -> None:
        self.waiting.remove(seq)
        self.waiting.started(seq)
        self._assign_slot(seq, reused, source)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _can_admit(self, seq: Sequence) -> bool:
        return self.slots.can_allocate(seq.kv_reservation)

    def _best_prefix(self, seq: Sequence) -> tuple[int, tuple[str, int]]:
        """The longest prefix of the prompt whose cells exist, capped at prompt - 1 (the
        last prompt token is always read: its logits give the first sample), and where:
        ("free", slot) for a free slot's cells, ("running", slot) for a running sequence's."""
        cap = seq.num_prompt - 1
        scope = seq.cache_scope
        best, free_slot = self.slots.longest_cached(seq.prompt_array, scope, cap)
        source = ("free", free_slot)
        if not self.config.prefix_caching:
            return 0, source
        for other in self.running:
            if other.slot is not None and other.num_computed > best and \
                    other.cache_scope == scope:
                computed = other.prompt_array[: min(other.num_computed, other.num_prompt)]
                shared = min(common_prefix(computed, seq.prompt_array), cap)
                if shared > best and shared >= self.config.min_copy_tokens:
                    best, source = shared, ("running", other.slot)
        return max(best, 0), source

    def _should_wait(self, seq: Sequence, reused: int) -> bool:
        """Whether a running sequence is still reading a prompt prefix this one shares."""
        if not self.config.prefix_caching:
            return False
        for other in self.running:
            if other.is_prefilling and other.cache_scope == seq.cache_scope:
                pending = min(common_prefix(other.prompt_array, seq.prompt_array),
                              seq.num_prompt - 1)
                if pending - reused >= SHARE_MIN_TOKENS and \
                        pending >= self.config.min_copy_tokens:
                    return True
        return False

    def _assign_slot(self, seq: Sequence, reused: int, source: tuple[str, int]) -> None:
        kind, source_slot = source
        if kind == "free":
            slot = self.slots.allocate(seq.kv_reservation, reused, slot=source_slot)
        else:
            slot = self.slots.allocate(seq.kv_reservation, reused, copy_from=source_slot)
        seq.slot = slot
        seq.num_computed = seq.num_cached = reused

    def _add_prefill(self, output: SchedulerOutput, seq: Sequence, budget: int) -> int:
        stop = len(seq.token_ids)
        if self.config.last_prompt_token_alone and seq.num_computed < stop - 1:
            stop -= 1  # the last prompt token comes in a later step, alone
        n = min(budget, stop - seq.num_computed)
        end = seq.num_computed + n
        output.chunks.append(
            ScheduledChunk(seq, seq.num_computed, seq.token_ids[seq.num_computed:end],
                           end == len(seq.token_ids))
        )
        return n

    def update_from_output(
        self, output: SchedulerOutput, sampled: Mapping[str, int | list[int]]
    ) -> list[Sequence]:
        """Record what the step computed and sampled; return the sequences it finished.

        `sampled` maps sequence id to the token drawn for every chunk with `sample` set, or
        for a chunk with drafts to the tokens drawn at its positions in order: the drafts
        kept and the token drawn after them. Tokens are appended one at a time and the
        sequence's end checked after each, so nothing past an end-of-generation token or
        max_tokens is kept; the KV cells of the drafts not kept are dropped before the
        next batch.
        """
        finished: list[Sequence] = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            end = chunk.start + len(chunk.tokens)
            seq.num_computed = end - chunk.num_draft
            if not chunk.sample:
                continue
            drawn = sampled[seq.seq_id]
            tokens = [drawn] if isinstance(drawn, int) else drawn
            reason = None
            for token in tokens:
                seq.token_ids.append(token)
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    break
            if seq.drafter is not None:
                record_drafts(seq, chunk, tokens)
            if chunk.num_draft:
                # The cells of the drafts kept hold the sequence's own tokens; the first
                # token not yet computed is the last one appended.
                seq.num_computed = len(seq.token_ids) - 1
                if seq.num_computed < end and seq.slot is not None:
                    self.slots.rewind(seq.slot, seq.num_computed)
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
        return self.slots.kv_reserved

