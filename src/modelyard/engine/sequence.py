"""The engine's request and sequence types: plain dataclasses, no llama.cpp, no HTTP."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt

from modelyard.engine.speculation import PromptLookup


class FinishReason(enum.StrEnum):
    STOP = "stop"
    """End of turn (an end-of-generation token) or a stop string."""
    LENGTH = "length"
    """max_tokens reached, or the sequence's context is full."""
    ABORT = "abort"
    """The client went away or the request was cancelled."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and when it stops (see sampling.py for the order)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1 at the API) is off."""
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    thinking_budget: int | None = None
    """Most tokens inside a reasoning block before the engine closes it itself."""


@dataclass(frozen=True)
class Share:
    """Whose turn a sequence waits for (see fair_share.py): its account's `key` and
    `weight`, and the `priority` of its API key inside the account (higher goes first)."""

    key: str | None = None
    """The account; None is the common share of requests that name none."""
    weight: float = 1.0
    priority: int = 0


COMMON_SHARE = Share()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generation: its prompt, its output so far and where it stands in the KV cache.

    `num_computed` counts tokens whose KV cells exist; the tokens from there to the end of
    `token_ids` are what the next step must feed.
    """

    seq_id: str
    """Unique among live sequences: the request's id, or `<request id>:<choice>` for `n` > 1."""
    prompt_ids: list[int]
    params: SamplingParams
    eog_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0
    """Prompt tokens whose KV cells were reused from an earlier sequence."""
    slot: int | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    cache_scope: str | None = None
    """Who may reuse this sequence's KV cells (e.g. its account); None is shared by all."""
    share: Share = COMMON_SHARE
    """Whose share of slots and prefill this sequence uses (its account, not its cache
    scope: accounts may share a cache scope)."""
    drafter: PromptLookup | None = None
    """Proposes draft tokens from the sequence's own text (speculation.py); None: the
    sequence is decoded a token per step."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @cached_property
    def prompt_array(self) -> npt.NDArray[np.int32]:
        return np.asarray(self.prompt_ids, dtype=np.int32)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.num_prompt

    @property
    def kv_reservation(self) -> int:
        """KV cells this sequence may come to hold: its prompt plus every token it may generate."""
        return self.num_prompt + self.params.max_tokens
