"""The request side of Anthropic's Messages API as pydantic models, with the chat route's
caps on hostile input (api/bounds.py).

Types are strict (a string where a number belongs is a 400); ranges are Anthropic's
(`temperature` 0 to 1, `top_k` from 0, `thinking.budget_tokens` from 1024 and below
`max_tokens`). Unknown fields are ignored, as the chat route ignores them; `cache_control`
is accepted anywhere Anthropic allows it and ignored (the engine's prefix cache needs no
markers). Images and documents are refused: no model served here has vision.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

from modelyard.api import bounds
from modelyard.api.bounds import has_oversized_integer, json_depth_exceeds, json_size
from modelyard.api.errors import APIError
from modelyard.api.schema import Identifier, _at_most, _schema_within
from modelyard.sampling import MAX_TOP_K, TopP

MIN_THINKING_BUDGET = 1024
"""Anthropic's smallest `thinking.budget_tokens`."""

AnthropicTemperature = Annotated[float, Strict(), Field(ge=0, le=1)]
AnthropicTopK = Annotated[int, Strict(), Field(ge=0, le=MAX_TOP_K)]
ToolName = Annotated[str, Field(min_length=1, max_length=bounds.MAX_NAME_CHARS,
                                pattern=r"^[A-Za-z0-9_.-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


def _json_object_within(value: dict[str, Any]) -> dict[str, Any]:
    """A tool call's `input`: nested at most as deep as a schema, integers within 64 bits."""
    if json_depth_exceeds(value, bounds.MAX_SCHEMA_DEPTH):
        raise ValueError(f"nests deeper than {bounds.MAX_SCHEMA_DEPTH} levels")
    if has_oversized_integer(value):
        raise ValueError("holds an integer beyond 64 bits")
    return value


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: Any = None


class ImageBlock(_Strict):
    """Accepted by the parser only to be refused with a clear message (no vision here)."""

    type: Literal["image", "document"]
    source: Any = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: Identifier
    name: ToolName
    input: Annotated[dict[str, Any], AfterValidator(_json_object_within)]
    cache_control: Any = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: Identifier
    content: (str | Annotated[list[Annotated[TextBlock | ImageBlock,
                                              Field(discriminator="type")]],
                              _at_most(bounds.MAX_TEXT_PARTS, "content blocks")]
               | None) = None
    is_error: bool | None = None
    cache_control: Any = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(block.text for block in self.content or ()
                         if isinstance(block, TextBlock))


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
                  | RedactedThinkingBlock, Field(discriminator="type")]


class InputMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], _at_most(bounds.MAX_TEXT_PARTS, "content blocks")]

    def text_chars(self) -> int:
        """Characters of its text, tool inputs (as JSON), tool results and thinking."""
        if isinstance(self.content, str):
            return len(self.content)
        size = 0
        for block in self.content:
            if isinstance(block, TextBlock):
                size += len(block.text)
            elif isinstance(block, ToolUseBlock):
                size += json_size(block.input)
            elif isinstance(block, ToolResultBlock):
                size += len(block.text())
            elif isinstance(block, ThinkingBlock):
                size += len(block.thinking)
            elif isinstance(block, RedactedThinkingBlock):
                size += len(block.data)
        return size


class ToolDefinition(_Strict):
    type: Literal["custom"] | None = None
    """Only client tools: Anthropic's server tools (web search, code execution ...) are
    not offered here, so their types fail the literal."""
    name: ToolName
    description: Annotated[str, Field(max_length=bounds.MAX_DESCRIPTION_CHARS)] | None = None
    input_schema: Annotated[dict[str, Any], _schema_within(bounds.MAX_SCHEMA_BYTES)]
    cache_control: Any = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise APIError(400, "tool_choice of type 'tool' needs a 'name' (and only it does)",
                           param="tool_choice")
        return self


class ThinkingEnabled(_Strict):
    type: Literal["enabled"]
    budget_tokens: Annotated[int, Field(ge=MIN_THINKING_BUDGET, le=bounds.MAX_INT)]


class ThinkingDisabled(_Strict):
    type: Literal["disabled"]


class ThinkingAdaptive(_Strict):
    """The model decides how much to think: its own default budget."""

    type: Literal["adaptive"]


Thinking = Annotated[ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive,
                     Field(discriminator="type")]


class JsonOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], _schema_within(bounds.MAX_RESPONSE_SCHEMA_BYTES)] = Field(
        alias="schema")


class OutputConfig(_Strict):
    """`format`: structured output, enforced by the engine's grammar as chat's
    response_format json_schema is; `effort`: the reasoning effort."""

    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonOutputFormat | None = None


class Metadata(_Strict):
    user_id: Identifier | None = None


class CountTokensRequest(_Strict):
    """What `/v1/messages/count_tokens` reads: the prompt side of a Messages request."""

    model: Identifier
    messages: Annotated[list[InputMessage], Field(min_length=1, max_length=bounds.MAX_MESSAGES)]
    system: (Annotated[str, Field(max_length=bounds.MAX_MESSAGE_CHARS)]
             | Annotated[list[TextBlock], _at_most(bounds.MAX_TEXT_PARTS, "system blocks")]
             | None) = None
    tools: Annotated[list[ToolDefinition] | None, _at_most(bounds.MAX_TOOLS, "tools")] = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @model_validator(mode="before")
    @classmethod
    def _integers_within_64_bits(cls, data: Any) -> Any:
        # Inside objects and arrays (tool schemas, unknown fields) any integer must fit in
        # 64 bits: the JSON encoder that measures and forwards them takes no larger one.
        # (A message's tool_use input is checked by its own field, which names it.)
        if isinstance(data, dict):
            for name, value in data.items():
                if name != "messages" and isinstance(value, dict | list) \
                        and has_oversized_integer(value):
                    raise APIError(400, f"'{name}' holds an integer beyond 64 bits",
                                   param=str(name))
        return data

    @field_validator("messages", mode="before")
    @classmethod
    def _few_enough_messages(cls, value: Any) -> Any:
        # Before each message is validated: 200,000 of them would take most of a second.
        if isinstance(value, list) and len(value) > bounds.MAX_MESSAGES:
            raise APIError(400, f"at most {bounds.MAX_MESSAGES} messages, got {len(value)}",
                           param="messages")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CountTokensRequest:
        self._check_messages()
        if self.tool_choice is not None and self.tool_choice.name is not None and (
                self.tool_choice.name not in {tool.name for tool in self.tools or ()}):
            raise APIError(400, f"tool_choice names '{self.tool_choice.name}', which is not "
                           "among the tools", param="tool_choice")
        return self

    def _check_messages(self) -> None:
        system = self.system
        total = len(system) if isinstance(system, str) else sum(
            len(block.text) for block in system or ())
        if total > bounds.MAX_MESSAGE_CHARS:
            raise APIError(400, f"system has at most {bounds.MAX_MESSAGE_CHARS} characters",
                           param="system")
        for index, message in enumerate(self.messages):
            if not isinstance(message.content, str) and any(
                    isinstance(block, ImageBlock) or (
                        isinstance(block, ToolResultBlock) and not isinstance(
                            block.content, str | None)
                        and any(isinstance(part, ImageBlock) for part in block.content))
                    for block in message.content):
                raise APIError(400, f"model '{self.model}' does not accept image or document "
                               "input", param=f"messages[{index}].content")
            chars = message.text_chars()
            total += chars
            if chars > bounds.MAX_MESSAGE_CHARS or total > bounds.MAX_TOTAL_CHARS:
                raise APIError(400, f"a message has at most {bounds.MAX_MESSAGE_CHARS} "
                               f"characters of text, all messages at most "
                               f"{bounds.MAX_TOTAL_CHARS}", param=f"messages[{index}].content")


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1, le=bounds.MAX_INT)]
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1,
                                                        max_length=bounds.MAX_STOP_CHARS)]],
                              Field(max_length=bounds.MAX_STOP_STRINGS)] | None = None
    temperature: AnthropicTemperature | None = None
    top_p: TopP | None = None
    top_k: AnthropicTopK | None = None
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _thinking_within(self) -> MessagesRequest:
        if isinstance(self.thinking, ThinkingEnabled) and (
                self.thinking.budget_tokens >= self.max_tokens):
            raise APIError(400, "thinking.budget_tokens must be less than max_tokens",
                           param="thinking.budget_tokens")
        return self
