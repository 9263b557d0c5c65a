"""A Responses request onto the chat core: its items become chat messages, its settings a
`ChatRequest`.

The conversation is the stored one of `previous_response_id` (its input and output items,
as plain item dicts), then this request's input; `instructions` come first as a system
message and are never carried over from a previous response (as OpenAI does). Consecutive
`function_call` items join the assistant message before them as its `tool_calls`;
`function_call_output` items become `tool` messages; reasoning items are kept in the
stored conversation but not shown to the template (as chat's `reasoning_content`).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from modelyard.api import bounds
from modelyard.api.errors import APIError
from modelyard.api.responses_api.schema import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    InputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    item_chars,
)
from modelyard.providers.base import ChatRequest
from modelyard.sampling import Sampling

_ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])


def stored_items(items: list[dict[str, Any]]) -> list[InputItem]:
    """Items read back from storage (written by this server; checked all the same)."""
    try:
        return _ITEMS.validate_python(items, strict=False)
    except ValidationError:
        raise APIError(500, "a stored response could not be read",
                       code="server_error") from None


def conversation(previous: list[InputItem], payload: ResponsesRequest) -> list[InputItem]:
    """The whole conversation: the previous response's items, then this request's input;
    within the caps of one request's text."""
    items = [*previous, *payload.items]
    if not items:
        raise APIError(422, "input is required (or a previous_response_id to continue)",
                       param="input", code="invalid_value")
    if len(items) > bounds.MAX_MESSAGES:
        raise APIError(422, f"the conversation has more than {bounds.MAX_MESSAGES} items",
                       param="previous_response_id", code="invalid_value")
    total = len(payload.instructions or "") + sum(item_chars(item) for item in items)
    if total > bounds.MAX_TOTAL_CHARS:
        raise APIError(422, f"the conversation has more than {bounds.MAX_TOTAL_CHARS} "
                       "characters of text", param="input", code="invalid_value")
    return items


def messages(instructions: str | None, items: list[InputItem]) -> list[dict[str, Any]]:
    """Chat messages (OpenAI's shape, as the chat template reads them) from items."""
    result: list[dict[str, Any]] = []
    if instructions:
        result.append({"role": "system", "content": instructions})
    for item in items:
        if isinstance(item, MessageItem):
            result.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = result[-1] if result else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                result.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            result.append({"role": "tool", "tool_call_id": item.call_id,
                           "content": item.text()})
        # ReasoningItem: not shown to the template
    return result


def _tool_choice(choice: str | FunctionChoice | None) -> str | dict[str, Any] | None:
    if isinstance(choice, FunctionChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def _response_format(payload: ResponsesRequest) -> dict[str, Any] | None:
    form = payload.text.format if payload.text else None
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": form.name or "response", "schema": form.schema_}
    if form.strict is not None:
        schema["strict"] = form.strict
    return {"type": "json_schema", "json_schema": schema}


def _effort(payload: ResponsesRequest) -> str | None:
    effort = payload.reasoning.effort if payload.reasoning else None
    return "high" if effort == "xhigh" else effort


def to_chat_request(payload: ResponsesRequest, items: list[InputItem], request_id: str,
                    account_id: str | None) -> ChatRequest:
    return ChatRequest(
        request_id=request_id,
        cache_scope=account_id,
        messages=messages(payload.instructions, items),
        max_tokens=payload.max_output_tokens,
        sampling=Sampling(temperature=payload.temperature, top_p=payload.top_p),
        tools=[{"type": "function",
                "function": tool.model_dump(exclude_none=True, exclude={"type"})}
               for tool in payload.function_tools],
        tool_choice=_tool_choice(payload.tool_choice),
        parallel_tool_calls=payload.parallel_tool_calls is not False,
        response_format=_response_format(payload),
        reasoning_effort=_effort(payload),
        enable_thinking=payload.enable_thinking,
        thinking_budget=payload.thinking_budget,
        stream=payload.stream,
    )


def item_dicts(items: list[InputItem]) -> list[dict[str, Any]]:
    """Items as stored: plain dicts in the Responses API's shapes, holding only what the
    caps counted (no unknown fields a client sent along)."""
    result: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            result.append({"type": "message", "role": item.role,
                           "content": [{"type": kind, "text": item.text()}]})
        elif isinstance(item, FunctionCallItem):
            result.append({"type": "function_call", "call_id": item.call_id,
                           "name": item.name, "arguments": item.arguments})
        elif isinstance(item, FunctionCallOutputItem):
            result.append({"type": "function_call_output", "call_id": item.call_id,
                           "output": item.text()})
        elif isinstance(item, ReasoningItem):
            result.append({"type": "reasoning", "summary": [],
                           "content": [{"type": "reasoning_text", "text": item.text()}]})
    return result


__all__ = ["conversation", "item_dicts", "messages", "stored_items", "to_chat_request"]
