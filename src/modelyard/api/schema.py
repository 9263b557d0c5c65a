"""The request side of SPEC.md as pydantic models, and their conversion to engine types.

Types are strict (a string where a number belongs is a 400); ranges are declared on
the fields (a number out of range is a 422 naming the field). Parameters that SPEC.md
defines but this server does not implement yet are refused with a 422 naming them,
never silently ignored.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelyard.api.errors import APIError

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: Any = None


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs content")
        return self

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
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    context_length_exceeded_behavior: Literal["truncate", "error"] = "truncate"
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    include_stop_str_in_output: bool | None = None
    seed: int | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    user: str | None = None

    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    enable_thinking: bool | None = None
    thinking_budget: Annotated[int, Field(ge=128, le=32768)] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    separate_reasoning: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise APIError(422, "stream_options is only allowed with stream: true",
                           param="stream_options", code="invalid_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(422, "top_logprobs needs logprobs: true", param="top_logprobs",
                           code="invalid_value")
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise APIError(422, f"logit_bias keys are token ids, got '{key}'",
                               param="logit_bias", code="invalid_value")
        for index, message in enumerate(self.messages):
            if isinstance(message.content, list) and any(
                isinstance(part, ImagePart) for part in message.content
            ):
                raise APIError(422, f"model '{self.model}' does not accept image input",
                               param=f"messages[{index}].content", code="invalid_value")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise APIError(422, "tool_choice needs tools", param="tool_choice",
                           code="invalid_value")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools and (
                self.tool_choice.function.name not in {t.function.name for t in self.tools}):
            raise APIError(422, f"tool_choice names '{self.tool_choice.function.name}', which "
                           f"is not among the tools", param="tool_choice", code="invalid_value")
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

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` wins over `max_tokens` when both are given."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens
