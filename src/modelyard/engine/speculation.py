"""Speculative decoding by prompt lookup: draft tokens from the sequence's own text.

Much of what a model writes repeats text it has already seen: an edited file, a quoted
document, JSON with the input's keys. `PromptLookup` keeps, per sequence, an index of the
n-grams of its prompt and output; each step it looks up the sequence's last n tokens
(longest n first) and proposes the tokens that followed their most recent earlier
occurrence. The scheduler puts these draft tokens after the sequence's last sampled token
in the same `llama_decode` call that decodes every other sequence, the engine samples
every position with the sequence's own sampler, and keeps the drafts up to the first
position whose sampled token differs from the draft, plus that sampled token (see
engine.py: greedy outputs are the tokens the model would have picked one at a time,
sampled outputs keep their distribution and draw the same random numbers).

Drafts cost: every draft token is one more token in the step, which all sequences in the
step wait for. `plan_drafts` gives draft tokens out by their chance of being kept,
estimated per sequence (`PromptLookup.first_rate`, `next_rate`, updated after every
verification and, while a sequence does not draft, from the draft it would have made,
followed token by token over the next steps), best chance first, and keeps the prefix of
that order with the most expected output tokens per unit of step time under a cost model
of a step: measured on the machine when the engine starts (`SpeculationConfig.step_costs`;
one more token in a step costs 0.2-0.3 of a one-token step on one 2-core CPU and up to
0.95 on another), else linear (`token_cost`).
A sequence whose drafts keep failing stops drafting; its estimate is still kept up to
date at no cost, so it drafts again when its text starts repeating.

Where the sequence's own text has no match as long as `HistoryConfig.ngram`, the drafts
come from its account's recent outputs (account_history.py); nothing is ever looked up in
another account's text.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from modelyard.engine.account_history import OutputHistory

RATE_WEIGHT = 0.25
"""Weight of the newest outcome in the running acceptance estimates."""


@dataclass(frozen=True)
class SpeculationConfig:
    max_draft: int = 16
    """Most draft tokens one sequence verifies in a step."""
    max_ngram: int = 4
    """Longest suffix looked up (longer matches are tried first)."""
    min_ngram: int = 2
    """Shortest suffix looked up; a one-token match drafts too often to pay."""
    max_step_drafts: int = 64
    """Most draft tokens in one step, all sequences together."""
    token_cost: float = 0.25
    """The cost of one more token in a decode step, as a fraction of a step of one token,
    where `step_costs` says nothing (0.2-0.3 measured on a 2-core Intel Xeon with the 0.5B
    default model, 0.4-0.95 on a 2-core AMD EPYC; a GPU's is far lower)."""
    step_costs: tuple[tuple[int, float], ...] = ()
    """Measured (tokens in a step, its time in steps of one token), by tokens
    (`LlamaRunner.measure_step_costs`): the cost model `plan_drafts` uses; empty: the
    linear one of `token_cost`."""
    first_rate: float = 0.3
    """The starting estimate of the chance that a sequence's first draft token is kept."""
    next_rate: float = 0.8
    """The starting estimate of the chance that a draft token after a kept one is kept."""
    account_history: bool = True
    """Where a sequence's own text has no match as long as the history's n-gram, draft
    from its account's recent outputs (account_history.py)."""

    def cost(self) -> StepCost:
        return StepCost(self.step_costs, self.token_cost)


@dataclass(frozen=True)
class StepCost:
    """The time of a decode step of n tokens in steps of one token: straight lines between
    the measured `points` (n, cost), sorted by n and starting at (1, 1.0); past the last,
    the slope of the last two; with no points, 1 + token_cost x (n - 1)."""

    points: tuple[tuple[int, float], ...] = ()
    token_cost: float = 0.25

    def __call__(self, n: int) -> float:
        points = self.points
        if not points:
            return 1.0 + self.token_cost * (n - 1)
        index = bisect.bisect_left(points, n, key=lambda point: point[0])
        if index < len(points) and points[index][0] == n:
            return points[index][1]
        if index == 0:
            return points[0][1]
        if index == len(points):
            n1, c1 = points[-1]
            slope = self.token_cost
            if len(points) > 1:
                n0, c0 = points[-2]
                slope = max((c1 - c0) / (n1 - n0), 0.0)
            return c1 + slope * (n - n1)
        (n0, c0), (n1, c1) = points[index - 1], points[index]
        return c0 + (c1 - c0) * (n - n0) / (n1 - n0)


class PromptLookup:
    """One sequence's n-gram index and its drafts' acceptance estimates.

    The index maps each n-gram of the sequence's tokens (n in [min_ngram, max_ngram]) to
    the position after its most recent occurrence; it is brought up to date lazily, a few
    dictionary writes per new token."""

    def __init__(self, config: SpeculationConfig, history: OutputHistory | None = None
                 ) -> None:
        self.config = config
        self.history = history
        """The account's recent outputs, drafted from where the sequence's own text has no
        long enough match; None: no account, or `account_history` off."""
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0
        self.first_rate = config.first_rate
        self.next_rate = config.next_rate
        self._copying: tuple[int, int] | None = None
        """(source position, text length) of the last proposal: while the text goes on
        copying from there, the next proposal continues the copy (an edited file is copied
        in order, even where its lines repeat each other)."""
        self.shadow: list[int] | None = None
        """The draft this sequence would have made in a step it did not draft, compared
        token by token with the tokens sampled in that step and the next ones (one a step)
        until one differs, to keep `first_rate` and `next_rate` current at no cost."""
        self._shadow_depth = 0

    def _sync(self, tokens: Seq[int]) -> None:
        lo, hi = self.config.min_ngram, self.config.max_ngram
        index = self._index
        for end in range(max(self._indexed, lo), len(tokens)):
            # every n-gram ending just before `end` was followed by tokens[end]
            for n in range(lo, min(hi, end) + 1):
                index[tuple(tokens[end - n:end])] = end
        self._indexed = max(self._indexed, len(tokens))

    def propose(self, tokens: Seq[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest
        suffix of `tokens` seen before; [] when none was."""
        if limit <= 0:
            return []
        self._sync(tokens)
        length = len(tokens)
        at = self._continued(tokens)
        matched = length
        if at is None:
            for matched in range(min(self.config.max_ngram, length - 1),
                                 self.config.min_ngram - 1, -1):
                at = self._index.get(tuple(tokens[length - matched:]))
                if at is not None:
                    break
        if self.history is not None and (at is None
                                         or matched < self.history.config.ngram):
            earlier = self.history.propose(tokens, limit)
            if earlier:
                self._copying = None
                return earlier
        if at is None:
            self._copying = None
            return []
        self._copying = (at, length)
        return list(tokens[at:min(at + limit, length)])

    def _continued(self, tokens: Seq[int]) -> int | None:
        """Where the copy of the last proposal's source goes on, if the tokens since (and
        the `min_ngram` before) match it."""
        if self._copying is None:
            return None
        source, then = self._copying
        length = len(tokens)
        at = source + length - then
        check = length - then + self.config.min_ngram
        if at >= length or at - check < 0:
            return None
        if any(tokens[at - i] != tokens[length - i] for i in range(1, check + 1)):
            return None
        return at

    def value(self, depth: int) -> float:
        """The estimated chance that the draft token at `depth` (1 = first) is kept."""
        return float(self.first_rate * self.next_rate ** (depth - 1))

    def record(self, draft: Seq[int], sampled: Seq[int]) -> int:
        """A verification's outcome: the drafts and the tokens sampled at their positions
        (one more than the drafts kept, or fewer when the sequence ended). Returns how many
        drafts were kept."""
        kept = 0
        for depth, (proposed, token) in enumerate(zip(draft, sampled, strict=False)):
            hit = proposed == token
            if depth == 0:
                self.first_rate += RATE_WEIGHT * (hit - self.first_rate)
            else:
                self.next_rate += RATE_WEIGHT * (hit - self.next_rate)
            if not hit:
                break
            kept += 1
        return kept

    def shadow_draft(self, draft: list[int]) -> None:
        """This step drafts nothing of `draft`: follow it as a shadow, unless one is being
        followed already (a shadow goes on across steps until it fails or ends)."""
        if self.shadow is None and draft:
            self.shadow, self._shadow_depth = draft, 0

    def drop_shadow(self) -> None:
        """The sequence drafts this step: its real drafts update the estimates."""
        self.shadow = None

    def record_shadow(self, token: int) -> None:
        """The token sampled in a step where this sequence did not draft: compared with the
        shadow's next token, as `record` compares a real draft's."""
        if self.shadow is None:
            return
        depth = self._shadow_depth
        hit = self.shadow[depth] == token
        if depth == 0:
            self.first_rate += RATE_WEIGHT * (hit - self.first_rate)
        else:
            self.next_rate += RATE_WEIGHT * (hit - self.next_rate)
        if hit and depth + 1 < len(self.shadow):
            self._shadow_depth = depth + 1
        else:
            self.shadow = None


def plan_drafts(proposals: list[tuple[PromptLookup, list[int]]], decode_tokens: int,
                budget: int, cost: float | StepCost) -> list[int]:
    """How many of its proposed tokens each sequence drafts this step (in `proposals`'
    order), at most `budget` in all.

    `cost` gives the time of a step of n tokens (a `StepCost`; a number is the linear
    model's `token_cost`: 1 + token_cost x (n - 1) steps of one token). Draft tokens are
    taken best chance first (a sequence's next token after its earlier ones), and the plan
    is the prefix of that order with the most expected output tokens per unit of step
    time. Under a linear cost that is where the next token's chance no longer pays for
    it; where a second token in a step costs most of a step and later ones less (a CPU's
    curve), a long draft can pay although its first token alone would not.
    """
    step_cost = cost if isinstance(cost, StepCost) else StepCost((), cost)
    counts = [0] * len(proposals)
    if budget <= 0 or not proposals:
        return counts
    expected = float(decode_tokens)
    tokens = max(decode_tokens, 1)
    best_rate, best_length = expected / step_cost(tokens), 0
    taken: list[int] = []
    heap = [(-drafter.value(1), i) for i, (drafter, draft) in enumerate(proposals) if draft]
    heapq.heapify(heap)
    while heap and len(taken) < budget:
        negative, i = heapq.heappop(heap)
        taken.append(i)
        counts[i] += 1
        expected -= negative
        tokens += 1
        rate = expected / step_cost(tokens)
        if rate > best_rate:
            best_rate, best_length = rate, len(taken)
        drafter, draft = proposals[i]
        if counts[i] < len(draft):
            heapq.heappush(heap, (-drafter.value(counts[i] + 1), i))
    counts = [0] * len(proposals)
    for i in taken[:best_length]:
        counts[i] += 1
    return counts
