"""The request of `POST /v1/responses` (OpenAI's Responses API) as pydantic models.

Strict types (a string where a number belongs is a 400) and the chat route's caps on
hostile input (api/bounds.py): lists are counted before their items are validated, text is
capped per item and in all, schemas by size and depth, ids and metadata by length. Unknown
fields are accepted (clients send many optional ones) and ignored; item and tool types this
server cannot serve (images, files, built-in tools) are a 422 naming them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Field, Tag, model_validator

from modelyard.api import bounds
from modelyard.api.bounds import has_oversized_integer
from modelyard.api.errors import APIError
from modelyard.api.schema import (
    Count,
    FunctionDefinition,
    FunctionName,
    Identifier,
    _at_most,
    _schema_within,
    _Strict,
)
from modelyard.sampling import Temperature, TopP

MAX_INPUT_ITEMS = bounds.MAX_MESSAGES
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
"""OpenAI's limits on `metadata`."""
RESPONSE_ID_CHARS = 64


class InputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


class Unsupported(_Strict):
    """A content part this server cannot read (images, files, audio): refused by name."""

    type: Literal["input_image", "input_file", "input_audio"]


Part = Annotated[InputText | Refusal | Unsupported, Field(discriminator="type")]
Content = Annotated[str | list[Part], _at_most(bounds.MAX_TEXT_PARTS, "content parts")]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if isinstance(part, InputText) else
                       part.refusal if isinstance(part, Refusal) else ""
                       for part in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: Identifier
    name: FunctionName
    arguments: str


class FunctionOutputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: Identifier
    output: Annotated[str | list[FunctionOutputText],
                      _at_most(bounds.MAX_TEXT_PARTS, "output parts")]

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.text for part in self.output)


class ReasoningText(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Strict):
    """A reasoning item passed back: accepted; the chat template does not show earlier
    turns' reasoning, as with chat's `reasoning_content`."""

    type: Literal["reasoning"]
    summary: Annotated[list[ReasoningText], _at_most(bounds.MAX_TEXT_PARTS, "parts")] = Field(
        default_factory=list)
    content: Annotated[list[ReasoningText] | None,
                       _at_most(bounds.MAX_TEXT_PARTS, "parts")] = None

    def text(self) -> str:
        return "".join(part.text for part in self.content or ())


class OtherItem(_Strict):
    """An item type of OpenAI's that this server does not serve: refused by name."""

    type: Literal["item_reference", "file_search_call", "computer_call",
                  "computer_call_output", "web_search_call", "image_generation_call",
                  "code_interpreter_call", "local_shell_call", "local_shell_call_output",
                  "mcp_list_tools", "mcp_approval_request", "mcp_approval_response",
                  "mcp_call", "custom_tool_call", "custom_tool_call_output", "compaction"]


_ITEM_TAGS = {"message": "MessageItem", "function_call": "FunctionCallItem",
              "function_call_output": "FunctionCallOutputItem", "reasoning": "ReasoningItem"}


def _item_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):
        return None
    return _ITEM_TAGS.get(kind, "OtherItem")


# Tags named after the classes: an error's location then names the item's fields only
# (`input[0].role`), as api/errors.py leaves out labels that start with a capital.
InputItem = Annotated[
    Annotated[MessageItem, Tag("MessageItem")]
    | Annotated[FunctionCallItem, Tag("FunctionCallItem")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutputItem")]
    | Annotated[ReasoningItem, Tag("ReasoningItem")]
    | Annotated[OtherItem, Tag("OtherItem")],
    Discriminator(_item_tag)]


def _item_type(value: Any) -> Any:
    """An item without `type` (OpenAI's "easy" input message) is a message."""
    if isinstance(value, list):
        return [dict(item, type="message") if isinstance(item, dict) and "type" not in item
                and "role" in item else item for item in value]
    return value


class FunctionTool(FunctionDefinition):
    """A function tool in the Responses API's flat shape."""

    type: Literal["function"]


class OtherTool(_Strict):
    type: str


def _tool_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "FunctionTool" if kind == "function" else "OtherTool"


AnyTool = Annotated[Annotated[FunctionTool, Tag("FunctionTool")]
                    | Annotated[OtherTool, Tag("OtherTool")], Discriminator(_tool_tag)]


def _metadata(value: Any) -> Any:
    """OpenAI's limits, checked before the map is validated (so that no key of a
    client's is echoed in an error)."""
    if not isinstance(value, dict):
        return value
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} keys, got {len(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ValueError("values must be strings")
        if len(key) > MAX_METADATA_KEY_CHARS or len(item) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"keys have at most {MAX_METADATA_KEY_CHARS} characters and "
                             f"values at most {MAX_METADATA_VALUE_CHARS}")
    return value


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: FunctionName


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(max_length=bounds.MAX_NAME_CHARS)] | None = None
    description: Annotated[str, Field(max_length=bounds.MAX_DESCRIPTION_CHARS)] | None = None
    schema_: Annotated[dict[str, Any] | None,
                       _schema_within(bounds.MAX_RESPONSE_SCHEMA_BYTES)] = Field(
        default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Strict):
    model: Identifier
    input: Annotated[list[InputItem] | str,
                     _at_most(MAX_INPUT_ITEMS, "input items")] = Field(default_factory=list)
    instructions: str | None = None
    tools: Annotated[list[AnyTool] | None,
                     _at_most(bounds.MAX_TOOLS, "tools")] = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    metadata: Annotated[dict[str, str] | None, BeforeValidator(_metadata)] = None
    user: Identifier | None = None
    store: bool = True
    previous_response_id: Annotated[Identifier, Field(max_length=RESPONSE_ID_CHARS)] | None = None
    stream: bool = False
    background: bool | None = None
    # modelyard's own reasoning fields, as on chat completions (SPEC.md)
    enable_thinking: bool | None = None
    thinking_budget: Annotated[int, Field(ge=128, le=32768)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # As every generating request: any integer inside an object fits in 64 bits.
            for name, value in data.items():
                if isinstance(value, dict | list) and has_oversized_integer(value):
                    raise APIError(422, f"'{name}' holds an integer beyond 64 bits",
                                   param=str(name), code="invalid_value")
            if "input" in data:
                data = {**data, "input": _item_type(data["input"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ResponsesRequest:
        if self.background:
            raise _invalid("background responses are not supported", "background")
        for index, tool in enumerate(self.tools or ()):
            if isinstance(tool, OtherTool):
                raise _invalid(f"tools of type '{tool.type[:40]}' are not supported; only "
                               "'function' tools are", f"tools[{index}].type")
        names = {tool.name for tool in self.function_tools}
        if self.tool_choice not in (None, "none") and not names:
            raise _invalid("tool_choice is only allowed when tools are specified",
                           "tool_choice")
        if isinstance(self.tool_choice, FunctionChoice) and self.tool_choice.name not in names:
            raise _invalid(f"tool_choice names '{self.tool_choice.name}', which is not among "
                           "the tools", "tool_choice")
        form = self.text.format if self.text else None
        if form is not None and form.type == "json_schema" and form.schema_ is None:
            raise _invalid("text.format json_schema needs a schema", "text.format.schema")
        self._check_items()
        return self

    def _check_items(self) -> None:
        items = self.input if isinstance(self.input, list) else ()
        total = len(self.instructions or "") + (len(self.input) if isinstance(
            self.input, str) else 0)
        for index, item in enumerate(items):
            if isinstance(item, OtherItem):
                raise _invalid(f"input items of type '{item.type}' are not supported",
                               f"input[{index}].type")
            if isinstance(item, MessageItem) and isinstance(item.content, list):
                for part in item.content:
                    if isinstance(part, Unsupported):
                        raise _invalid(f"model '{self.model}' does not accept '{part.type}' "
                                       "input", f"input[{index}].content")
            chars = item_chars(item)
            if chars > bounds.MAX_MESSAGE_CHARS:
                raise _invalid(f"an input item has at most {bounds.MAX_MESSAGE_CHARS} "
                               "characters of text", f"input[{index}]")
            total += chars
        if total > bounds.MAX_TOTAL_CHARS:
            raise _invalid(f"the input has at most {bounds.MAX_TOTAL_CHARS} characters of "
                           "text in all", "input")

    @property
    def function_tools(self) -> list[FunctionTool]:
        return [tool for tool in self.tools or () if isinstance(tool, FunctionTool)]

    @property
    def items(self) -> list[InputItem]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


def item_chars(item: InputItem) -> int:
    """Characters of an item's text (what the caps count)."""
    if isinstance(item, MessageItem | ReasoningItem | FunctionCallOutputItem):
        return len(item.text())
    if isinstance(item, FunctionCallItem):
        return len(item.arguments) + len(item.name)
    return 0


def _invalid(message: str, param: str) -> APIError:
    return APIError(422, message, param=param, code="invalid_value")
