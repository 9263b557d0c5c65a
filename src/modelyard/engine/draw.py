"""Drawing a sequence's tokens from a step's logits: each row under the sequence's forced
tokens, grammar mask, reasoning budget and sampler (`draw`), and the walk over a chunk's
rows that keeps its draft tokens while they are what is drawn (`verify`)."""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
import numpy.typing as npt

from modelyard.engine.sampling import Sample
from modelyard.engine.state import SequenceState


def verify(state: SequenceState, rows: npt.NDArray[np.float32], draft: list[int],
           mask_pool: Executor) -> list[Sample]:
    """Sample a chunk's rows in order with the sequence's own sampler: row i after the
    tokens drawn from rows < i, which equal the drafts before it. A draft is kept when
    the token drawn at its position is the draft itself; the first token that differs
    (or the one after the last draft) ends the walk. Greedy, this keeps exactly the
    tokens decoding one at a time would give; sampled, each token is drawn from the
    distribution and with the random numbers it would have without drafts (accepting a
    point-mass draft with probability p(draft) and otherwise drawing from p without it
    is the speculative sampling rule), so a seed gives the same text either way.

    Under a grammar, `draw` consumes each drawn token into the sequence's matcher
    before the next row is sampled, so every position is masked by the grammar as it
    stands after the drafts before it, and only tokens drawn (never a draft that was not
    kept) advance the grammar; a grammar that completes ends the walk."""
    drawn: list[Sample] = []
    for i in range(rows.shape[0]):
        sample = draw(state, rows[i], mask_pool)
        drawn.append(sample)
        if (i >= len(draft) or sample.token != draft[i]
                or sample.token in state.seq.eog_ids or state.grammar_done):
            break
    return drawn


def draw(state: SequenceState, logits: np.ndarray[tuple[int], np.dtype[np.float32]],
         mask_pool: Executor) -> Sample:
    """The sequence's next token from one row of logits; its grammar's next mask starts
    computing on `mask_pool` at once, so it overlaps what comes before the next draw."""
    if state.forced:
        token = state.forced.pop(0)
        state.answer_due = not state.forced
        return Sample(token)
    matcher = state.matcher
    allowed = matcher.allowed() if matcher is not None and matcher.active else None
    if state.answer_due:  # right after a closed reasoning block, the answer must begin
        state.answer_due = False
        allowed = without(allowed, state.seq.eog_ids, logits.shape[0])
    sample = state.sampler.sample(logits, allowed)
    if matcher is not None:
        matcher.consume(sample.token)
        # Read the grammar's state before the next mask starts computing on its thread.
        state.grammar_done = matcher.done
        if not state.grammar_done:
            matcher.prefetch(mask_pool)
    if state.reasoning is not None:
        state.reasoning_tokens += 1  # the closing tag, forced or not, is not counted
        budget = state.seq.params.thinking_budget
        if budget is not None and state.reasoning_tokens >= budget:
            # At the budget the engine closes the block itself; the answer follows.
            state.forced = list(state.reasoning.close_ids)
            state.reasoning = None
    return sample


def without(allowed: npt.NDArray[np.bool_] | None, banned: frozenset[int],
            n_vocab: int) -> npt.NDArray[np.bool_]:
    """`allowed` (everything, if None) less the `banned` tokens."""
    mask = np.ones(n_vocab, dtype=np.bool_) if allowed is None else allowed.copy()
    mask[list(banned)] = False
    return mask
