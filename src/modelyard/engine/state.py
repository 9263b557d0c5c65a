"""The engine thread's state per request and per sequence (a request's choices).

The scheduler sees only `Sequence` (tokens, slot, status); everything else the engine
keeps about a sequence while it generates (its sampler, detokenizer, stop-string and
grammar matchers, reasoning budget, logprobs not yet sent) lives in one `SequenceState`,
and one `RequestState` groups the sequences of a request with the queue its outputs go to.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from modelyard.engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from modelyard.engine.grammar import GrammarMatcher
from modelyard.engine.sampling import Sampler, TokenLogprob
from modelyard.engine.sequence import FinishReason, Sequence


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


@dataclass(frozen=True)
class ReasoningTags:
    """How a model marks its reasoning: the closing tag's text and its token ids."""

    close_text: str
    close_ids: tuple[int, ...]


@dataclass(eq=False)
class RequestState:
    """One request: its sequences (one per choice) and where their outputs go."""

    request_id: str
    queue: asyncio.Queue[EngineOutput]
    loop: asyncio.AbstractEventLoop
    sequences: list[SequenceState] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    aborted: bool = False
    """Set by `Engine.abort` on the event loop; its outputs are no longer delivered."""


@dataclass(eq=False)
class SequenceState:
    """Everything the engine keeps about one sequence (one choice of a request)."""

    index: int
    """The choice's index in its request."""
    seq: Sequence
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    request: RequestState
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

    @property
    def seq_id(self) -> str:
        return self.seq.seq_id
