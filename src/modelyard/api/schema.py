"""The request side of SPEC.md as pydantic models, and their conversion to engine types.

Types are strict (a string where a number belongs is a 400); ranges are declared on
the fields (a number out of range is a 422 naming the field). Parameters that SPEC.md
defines but this server does not implement yet are refused with a 422 naming them,
never silently ignored.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from modelyard.api import bounds
from modelyard.api.bounds import (
    has_control_characters,
    has_oversized_integer,
    is_token_id,
    json_depth_exceeds,
    json_size,
)
from modelyard.api.errors import APIError
from modelyard.sampling import (
    SAMPLING_FIELDS,
    MinP,
    Penalty,
    RepetitionPenalty,
    Sampling,
    Temperature,
    TopK,
    TopP,
)

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


def _no_control_characters(value: str) -> str:
    if has_control_characters(value):
        raise ValueError("control characters are not allowed")
    return value


def _schema_within(max_bytes: int) -> AfterValidator:
    def check(value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if json_depth_exceeds(value, bounds.MAX_SCHEMA_DEPTH):
            raise ValueError(f"nests deeper than {bounds.MAX_SCHEMA_DEPTH} levels")
        if json_size(value) > max_bytes:
            raise ValueError(f"is larger than {max_bytes} bytes as JSON")
        return value
    return AfterValidator(check)


def _at_most(limit: int, what: str) -> BeforeValidator:
    """A cap on a list's (or map's) length checked before its items are validated."""
    def check(value: Any) -> Any:
        if isinstance(value, list | dict) and len(value) > limit:
            raise ValueError(f"at most {limit} {what}, got {len(value)}")
        return value
    return BeforeValidator(check)


Identifier = Annotated[str, Field(max_length=bounds.MAX_ID_CHARS),
                       AfterValidator(_no_control_characters)]
"""A short opaque string: ids, `user`, `model`."""
FunctionName = Annotated[str, Field(max_length=bounds.MAX_NAME_CHARS)]
Count = Annotated[int, Field(ge=1, le=bounds.MAX_INT)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: Any = None


class FunctionCall(_Strict):
    name: FunctionName
    arguments: str


class ToolCall(_Strict):
    id: Identifier
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None,
        _at_most(bounds.MAX_TEXT_PARTS, "content parts")] = None
    # OpenAI's rule for participant names: no whitespace and none of < | \ / >.
    name: Annotated[str, Field(min_length=1, max_length=bounds.MAX_NAME_CHARS,
                               pattern=r"^[^\s<|\\/>]+$")] | None = None
    tool_calls: Annotated[list[ToolCall] | None,
                          _at_most(bounds.MAX_TOOL_CALLS, "tool calls")] = None
    tool_call_id: Identifier | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs content")
        return self

    def text_chars(self) -> int:
        """Characters of the message's text: content, tool call arguments, reasoning."""
        if isinstance(self.content, str):
            size = len(self.content)
        else:
            size = sum(len(p.text) for p in self.content or () if isinstance(p, TextPart))
        size += sum(len(call.function.arguments) for call in self.tool_calls or ())
        return size + len(self.reasoning_content or "")

    def to_template_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role}
        if isinstance(self.content, list):
            data["content"] = [part.model_dump(exclude_none=True) for part in self.content]
        else:
            data["content"] = self.content
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.tool_calls:
            data["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return data


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: Annotated[str, Field(max_length=bounds.MAX_DESCRIPTION_CHARS)] | None = None
    parameters: Annotated[dict[str, Any] | None, _schema_within(bounds.MAX_SCHEMA_BYTES)] = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: Annotated[str, Field(max_length=bounds.MAX_DESCRIPTION_CHARS)] | None = None
    schema_: Annotated[dict[str, Any] | None,
                       _schema_within(bounds.MAX_RESPONSE_SCHEMA_BYTES)] = Field(
        default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


def few_enough_messages(cls: type[BaseModel], value: Any) -> Any:
    """`messages` within MAX_MESSAGES, checked before each message is validated (200,000 of
    them would take most of a second); a field validator for every request with messages."""
    if isinstance(value, list) and len(value) > bounds.MAX_MESSAGES:
        raise APIError(422, f"at most {bounds.MAX_MESSAGES} messages, got {len(value)}",
                       param="messages", code="invalid_value")
    return value


class GenerationRequest(_Strict):
    """The fields every generating endpoint shares (chat and text completions), with the
    checks that go with them."""

    model: Identifier
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    # The sampling fields (modelyard/sampling.py: their one definition and ranges).
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]] | None,
                          _at_most(bounds.MAX_LOGIT_BIAS, "entries")] = None
    stop: (Annotated[str, Field(max_length=bounds.MAX_STOP_CHARS)]
           | Annotated[list[Annotated[str, Field(max_length=bounds.MAX_STOP_CHARS)]],
                       Field(max_length=bounds.MAX_STOP_STRINGS)]
           | None) = None
    include_stop_str_in_output: bool | None = None
    # Every 64-bit seed, signed or not, as OpenAI accepts them.
    seed: Annotated[int, Field(ge=bounds.SEED_MIN, le=bounds.SEED_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    user: Identifier | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _integers_within_64_bits(cls, data: Any) -> Any:
        # Top-level numbers have bounds of their own (seed, max_tokens ...); inside objects
        # and arrays (tool schemas, response formats, unknown fields) any integer must fit.
        if isinstance(data, dict):
            for name, value in data.items():
                if name in cls.checked_arrays:
                    continue
                if isinstance(value, dict | list) and has_oversized_integer(value):
                    raise APIError(422, f"'{name}' holds an integer beyond 64 bits",
                                   param=str(name), code="invalid_value")
        return data

    checked_arrays: ClassVar[frozenset[str]] = frozenset()
    """Fields whose integers the field's own type bounds (a prompt's token ids)."""

    @model_validator(mode="after")
    def _consistent_generation(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise APIError(422, "stream_options is only allowed with stream: true",
                           param="stream_options", code="invalid_value")
        for key in self.logit_bias or {}:
            if not is_token_id(key):
                shown = key if len(key) <= 20 else f"{key[:20]}…"
                raise APIError(422, f"logit_bias keys are token ids (ASCII digits, at most "
                               f"{bounds.MAX_TOKEN_ID}), got '{shown}'",
                               param="logit_bias", code="invalid_value")
        if (self.response_format is not None and self.response_format.type == "json_schema"
                and self.response_format.json_schema is None):
            raise APIError(422, "response_format json_schema needs a json_schema object",
                           param="response_format", code="invalid_value")
        if self.model_extra:
            logger.debug("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self) -> Sampling:
        return Sampling(**{name: getattr(self, name) for name in SAMPLING_FIELDS})

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1, max_length=bounds.MAX_MESSAGES)]
    max_completion_tokens: Count | None = None
    context_length_exceeded_behavior: Literal["truncate", "error"] = "truncate"
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    tools: Annotated[list[Tool] | None, _at_most(bounds.MAX_TOOLS, "tools")] = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    enable_thinking: bool | None = None
    thinking_budget: Annotated[int, Field(ge=128, le=32768)] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    separate_reasoning: bool | None = None

    _few_enough_messages = field_validator("messages", mode="before")(few_enough_messages)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(422, "top_logprobs needs logprobs: true", param="top_logprobs",
                           code="invalid_value")
        self._check_messages()
        if self.tool_choice not in (None, "none") and not self.tools:
            raise APIError(422, "tool_choice is only allowed when tools are specified",
                           param="tool_choice", code="invalid_value")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools and (
                self.tool_choice.function.name not in {t.function.name for t in self.tools}):
            raise APIError(422, f"tool_choice names '{self.tool_choice.function.name}', which "
                           f"is not among the tools", param="tool_choice", code="invalid_value")
        return self

    def _check_messages(self) -> None:
        total = 0
        for index, message in enumerate(self.messages):
            if isinstance(message.content, list) and any(
                    isinstance(part, ImagePart) for part in message.content):
                raise APIError(422, f"model '{self.model}' does not accept image input",
                               param=f"messages[{index}].content", code="invalid_value")
            chars = message.text_chars()
            if chars > bounds.MAX_MESSAGE_CHARS:
                raise APIError(422, f"a message has at most {bounds.MAX_MESSAGE_CHARS} "
                               f"characters of text", param=f"messages[{index}].content",
                               code="invalid_value")
            total += chars
            if total > bounds.MAX_TOTAL_CHARS:
                raise APIError(422, f"the messages have at most {bounds.MAX_TOTAL_CHARS} "
                               f"characters of text in all", param=f"messages[{index}].content",
                               code="invalid_value")

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` wins over `max_tokens` when both are given."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens
