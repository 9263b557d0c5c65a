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

    # Defined by SPEC.md, implemented in later releases: accepted only at their no-op values.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    reasoning_effort: str | None = None
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
        if self.model_extra:
            logger.debug("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self

    def unsupported_parameter(self) -> str | None:
        """The first SPEC.md parameter given a value this release does not implement."""
        no_op_values: dict[str, tuple[Any, ...]] = {
            "tools": (None, []),
            "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
            "response_format": (None, {"type": "text"}), "enable_thinking": (None,),
            "thinking_budget": (None,), "reasoning_effort": (None,),
            "separate_reasoning": (None,),
        }
        for name, allowed in no_op_values.items():
            if getattr(self, name) not in allowed:
                return name
        return None

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


def check_supported(request: ChatCompletionRequest) -> None:
    name = request.unsupported_parameter()
    if name is not None:
        raise APIError(422, f"parameter '{name}' is not supported by this server yet",
                       param=name, code="unsupported_parameter")
