"""The Provider interface: what the HTTP layer asks of anything that answers a model.

A provider receives a `ChatRequest` (plain data, already validated against SPEC.md).
`prepare_chat` renders and counts the prompt and settles max_tokens (refusing a prompt
that does not fit), so the platform can reserve the request's maximum cost before
anything runs; `start_chat` then queues it and answers with a stream of `ChatDelta`s.
Everything that can be refused is refused before the first delta, so the HTTP layer can
still answer with a status code instead of an error event inside a stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from modelyard.errors import ModelyardError, Refusal
from modelyard.providers.tokens import Tokenizer

DEFAULT_MAX_TOKENS_BOUND = 32768
"""A completion's bound when neither the request nor the model's context sets one."""


@dataclass(frozen=True)
class ChatRequest:
    """One validated request; None means "not given" (the model's default applies)."""

    request_id: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    truncate_to_context: bool = True
    """When prompt + max_tokens exceed the context: lower max_tokens (True) or refuse."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI tool definitions ({"type": "function", "function": {...}})."""
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    reasoning_effort: str | None = None
    separate_reasoning: bool = True
    stream: bool = False
    """Whether the client asked for a stream (an upstream is asked the same way)."""
    cache_scope: str | None = None
    """Who may share prefix-cache cells with this request (the caller's account); None
    shares with every request that also has none."""


@dataclass(frozen=True)
class ToolCallDelta:
    """A tool call of one choice: `index` counts the choice's calls. The built-in engine
    sends whole calls; an upstream's are passed on as they stream: the first fragment of a
    call has its id and name, the fragments after it (same index, no id or name) only more
    of its arguments."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token in OpenAI's logprobs shape: its text, bytes and log-probability,
    and the most likely alternatives (text, bytes, logprob), best first."""

    token: str
    bytes: list[int]
    logprob: float
    top: tuple[tuple[str, list[int], float], ...] = ()


@dataclass(frozen=True)
class ChatDelta:
    """New text of one choice. Token counts are the request's totals so far (the prompt
    counted once, completion tokens summed over every choice)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    cached_tokens: int = 0
    index: int = 0
    logprobs: tuple[TokenLogprobs, ...] | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    reasoning_tokens: int = 0
    usage_estimated: bool = False
    """The token counts are modelyard's estimate, not the model server's report."""


@dataclass(frozen=True)
class PreparedChat:
    request: ChatRequest
    prompt_tokens: int
    max_tokens: int
    """The completion cap after defaults and context limits."""
    work: Any = None
    """What the provider itself needs to run it (token ids, sampling parameters)."""


class ProviderError(Refusal):
    """A refusal in SPEC.md's terms (status 422, 503, ...), raised before any delta;
    `retry_after` (seconds) is sent as the Retry-After header."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(status, message, param=param, code=code,
                         headers={"Retry-After": str(retry_after)} if retry_after else None)
        self.retry_after = retry_after


class StreamError(ModelyardError):
    """A failure after the first delta; ends the stream with an error event (a 500 whose
    message, modelyard's own words, the client reads)."""

    code = "server_error"
    exposed = True


PROMPT_OVERHEAD_TOKENS = 64
"""What a chat template adds to any prompt besides its messages (a default system prompt,
the generation prompt), at most."""
MESSAGE_OVERHEAD_TOKENS = 8
"""What it adds around one message, at most (beyond the message's JSON, which counts)."""
TOOLS_OVERHEAD_TOKENS = 512
"""What it adds when tools are given (instructions around their definitions), at most."""


def json_bytes(value: Any) -> int:
    return len(orjson.dumps(value))


class Provider(ABC):
    """Answers chat completions for one catalog model."""

    model_id: str

    def context_limit(self) -> int | None:
        """The most tokens one request may hold, prompt and completion (None: unknown)."""
        value = self.describe().get("context_length")
        return value if isinstance(value, int) and value > 0 else None

    def prompt_token_bound(self, request: ChatRequest) -> int:
        """An upper bound of the request's prompt tokens, without rendering or tokenizing
        it: no token is shorter than one UTF-8 byte, so the bytes of the messages, tools
        and response format as JSON, plus the template's markup, capped by the context (a
        longer prompt is refused before it runs)."""
        bound = (json_bytes(request.messages) + PROMPT_OVERHEAD_TOKENS
                 + MESSAGE_OVERHEAD_TOKENS * len(request.messages))
        if request.tools:
            bound += json_bytes(request.tools) + TOOLS_OVERHEAD_TOKENS
        if request.response_format:
            bound += json_bytes(request.response_format)
        context = self.context_limit()
        return bound if context is None else min(bound, context)

    def max_tokens_bound(self, request: ChatRequest) -> int:
        """An upper bound of one choice's completion tokens (before the prompt is known)."""
        context = self.context_limit()
        if request.max_tokens is not None:
            return request.max_tokens if context is None else min(request.max_tokens, context)
        return context if context is not None else DEFAULT_MAX_TOKENS_BOUND

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Extra fields of this model's entry in /v1/models (context length, capabilities)."""

    @abstractmethod
    async def prepare_chat(self, request: ChatRequest) -> PreparedChat:
        """Render and count the prompt, fix max_tokens; raise ProviderError if it cannot run."""

    @abstractmethod
    async def start_chat(self, prepared: PreparedChat) -> AsyncIterator[ChatDelta]:
        """Queue the request; return the stream of its deltas.

        The last delta has a `finish_reason`. Leaving the iteration early (the client went
        away) must free whatever the request holds.
        """

    def tokenizer(self) -> Tokenizer | None:
        """The model's own tokenizer, counting exactly what `prepare_chat` counts (for
        /tokenize and /detokenize); None when this server has none (an upstream's)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources at shutdown."""
