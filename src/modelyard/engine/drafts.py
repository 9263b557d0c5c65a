"""Draft tokens in a step's plan (speculative decoding by prompt lookup): the scheduler
asks `add_drafts` to extend the decode chunks of a step, and reports what the engine kept
with `record_drafts`. The drafts themselves and how many pay come from speculation.py."""

from __future__ import annotations

from modelyard.engine.plan import ScheduledChunk, SchedulerConfig, SchedulerOutput
from modelyard.engine.sequence import Sequence
from modelyard.engine.speculation import PromptLookup, plan_drafts


def add_drafts(output: SchedulerOutput, budget: int, config: SchedulerConfig) -> int:
    """Put draft tokens after the decode chunks' last tokens, within `budget` and so that
    no sequence can pass its max_tokens, its KV reservation or the context even if every
    draft is kept. Returns the draft tokens added."""
    spec = config.speculation
    assert spec is not None
    budget = min(budget, spec.max_step_drafts)
    proposals: list[tuple[int, PromptLookup, list[int]]] = []
    for i, chunk in enumerate(output.chunks):
        seq = chunk.seq
        if seq.drafter is None or len(chunk.tokens) != 1:
            continue
        room = min(spec.max_draft, seq.params.max_tokens - seq.num_output - 1,
                   config.context_per_sequence - len(seq.token_ids) - 1)
        draft = seq.drafter.propose(seq.token_ids, room)
        if draft:
            proposals.append((i, seq.drafter, draft))
    counts = plan_drafts([(drafter, draft) for _, drafter, draft in proposals],
                         len(output.chunks), budget, spec.cost())
    added = 0
    for (i, drafter, draft), count in zip(proposals, counts, strict=True):
        if not count:
            drafter.shadow_draft(draft)
            continue
        drafter.drop_shadow()
        chunk = output.chunks[i]
        output.chunks[i] = ScheduledChunk(chunk.seq, chunk.start,
                                          chunk.tokens + draft[:count], True, count)
        added += count
    return added


def record_drafts(seq: Sequence, chunk: ScheduledChunk, tokens: list[int]) -> None:
    """A decode chunk's outcome for its sequence's acceptance estimates: the tokens drawn
    at its positions (against its drafts, or against the draft it would have made)."""
    drafter = seq.drafter
    assert drafter is not None
    if chunk.num_draft:
        drafter.record(chunk.draft, tokens)
    elif tokens:
        drafter.record_shadow(tokens[0])
