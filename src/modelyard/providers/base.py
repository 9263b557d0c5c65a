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
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import orjson

from modelyard.engine.sequence import SamplingParams, Share
from modelyard.errors import ModelyardError, Refusal
from modelyard.providers.tokens import Tokenizer
from modelyard.sampling import NEUTRAL, Sampling
from modelyard.usage import Usage

W = TypeVar("W")

DEFAULT_MAX_TOKENS_BOUND = 32768
"""A completion's bound when neither the request nor the model's context sets one."""


@dataclass(frozen=True)
class RawPrompt:
    """A text completion's prompt, sent to the model as it is (no chat template): text, or
    token ids. `suffix` asks for fill-in-the-middle (the model's own FIM tokens around
    the prompt and the suffix); `echo` puts the prompt before each choice's text."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    suffix: str | None = None
    echo: bool = False

    def byte_bound(self) -> int:
        """An upper bound of its tokens (no token is shorter than a byte), besides the
        three FIM tokens and a BOS."""
        size = len(self.token_ids) if self.token_ids is not None else len(
            (self.text or "").encode())
        return size + len((self.suffix or "").encode()) + 4


@dataclass(frozen=True)
class ChatRequest:
    """One validated request; None means "not given" (the model's default applies)."""

    request_id: str
    messages: list[dict[str, Any]]
    """The conversation, through the model's chat template (empty with a `prompt`)."""
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    """The sampling fields the request set (each left out takes the model's default)."""
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
    share: Share | None = None
    """Whose share of a built-in engine's slots and prefill the request takes (the caller's
    account, its weight and its key's priority); None: the common share."""
    prompt: RawPrompt | None = None
    """A text completion (/v1/completions): this prompt instead of `messages`."""

    def sampling_over(self, defaults: Sampling) -> Sampling:
        """The fields to send upstream: the request's, each left out taken from the
        model's `defaults` (only the fields one of them sets)."""
        return self.sampling.over(defaults)

    def to_sampling_params(self, defaults: Sampling, max_tokens: int,
                           thinking_budget: int | None = None) -> SamplingParams:
        """The built-in engine's parameters: the request's sampling fields over the
        model's `defaults`, over OpenAI's (NEUTRAL)."""
        fields = self.sampling.over(defaults).over(NEUTRAL)
        return SamplingParams(
            temperature=_set(fields.temperature), top_p=_set(fields.top_p),
            top_k=max(0, _set(fields.top_k)), min_p=_set(fields.min_p),
            frequency_penalty=_set(fields.frequency_penalty),
            presence_penalty=_set(fields.presence_penalty),
            repetition_penalty=_set(fields.repetition_penalty),
            logit_bias=dict(self.logit_bias), max_tokens=max_tokens, stop=self.stop,
            include_stop_str_in_output=self.include_stop_str_in_output, seed=self.seed,
            logprobs=self.logprobs, top_logprobs=self.top_logprobs,
            thinking_budget=thinking_budget)


T = TypeVar("T")


def _set(value: T | None) -> T:
    assert value is not None  # NEUTRAL sets every field
    return value


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
    """New text of one choice, and the request's usage so far (its totals: the prompt
    counted once, completion tokens summed over every choice)."""

    text: str
    usage: Usage
    finish_reason: str | None = None
    index: int = 0
    logprobs: tuple[TokenLogprobs, ...] | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


class ChatStream(Protocol):
    """A started request's deltas. The last delta has a `finish_reason` and the final
    usage; `aclose` stops the request (the client went away) and frees what it holds."""

    def __aiter__(self) -> AsyncIterator[ChatDelta]: ...

    async def aclose(self) -> None: ...

    async def drain_usage(self, seconds: float) -> Usage | None:
        """After the client went away: the final usage of work that goes on elsewhere (an
        upstream that generates to the end), read for at most `seconds`; None when the
        usage already delivered is final (the work stopped with the client)."""
        ...


class DeltaStream:
    """A ChatStream over an async generator of deltas whose work stops when it is
    closed (the built-in engine's): nothing to drain."""

    def __init__(self, deltas: AsyncGenerator[ChatDelta, None]) -> None:
        self._deltas = deltas

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        return self._deltas

    async def aclose(self) -> None:
        await self._deltas.aclose()

    async def drain_usage(self, seconds: float) -> Usage | None:
        return None


@dataclass(frozen=True)
class PreparedChat(Generic[W]):
    """A request its provider has read: what the platform reserves for, and the
    provider's own work (`W`: token ids and sampling parameters, an upstream body...)."""

    request: ChatRequest
    prompt_tokens: int
    max_tokens: int
    """The completion cap after defaults and context limits."""
    work: W
    provider: Provider[W]

    async def start(self) -> ChatStream:
        """Queue it on the provider that prepared it."""
        return await self.provider.start_chat(self)


class Prepared(Protocol):
    """A `PreparedChat` of any provider, as the HTTP layer sees it."""

    @property
    def request(self) -> ChatRequest: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    async def start(self) -> ChatStream: ...


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


class ChatModel(Protocol):
    """A model as the HTTP layer sees it: any `Provider`, whatever its work type."""

    model_id: str

    def describe(self) -> dict[str, Any]: ...

    def context_limit(self) -> int | None: ...

    def prompt_token_bound(self, request: ChatRequest) -> int: ...

    def max_tokens_bound(self, request: ChatRequest) -> int: ...

    async def prepare_chat(self, request: ChatRequest) -> Prepared: ...

    def tokenizer(self) -> Tokenizer | None: ...

    async def close(self) -> None: ...


class Provider(ABC, Generic[W]):
    """Answers chat completions for one catalog model; `W` is what it prepares a request
    into (see PreparedChat)."""

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
        if request.prompt is not None:
            bound = request.prompt.byte_bound()
        else:
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
    async def prepare_chat(self, request: ChatRequest) -> PreparedChat[W]:
        """Render and count the prompt, fix max_tokens; raise ProviderError if it cannot run."""

    @abstractmethod
    async def start_chat(self, prepared: PreparedChat[W]) -> ChatStream:
        """Queue the request; return the stream of its deltas.

        The last delta has a `finish_reason`. Closing the stream early (the client went
        away) must free whatever the request holds.
        """

    def tokenizer(self) -> Tokenizer | None:
        """The model's own tokenizer, counting exactly what `prepare_chat` counts (for
        /tokenize and /detokenize); None when this server has none (an upstream's)."""
        return None

    async def close(self) -> None:
        """Release resources at shutdown."""
