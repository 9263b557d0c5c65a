"""Anthropic's Messages request onto the chat core's `ChatRequest`, and the core's finish
reasons and usage back into Anthropic's terms.

The conversation becomes chat messages as the chat route builds them: `system` a system
message; a user turn's `tool_result` blocks one `tool` message each (an error's text marked
as one), its text blocks a user message after them; an assistant turn's text its content,
its `tool_use` blocks its tool calls (their `input` as JSON arguments). Thinking blocks
passed back are dropped, as the chat route drops `reasoning_content` of past turns (the
chat templates served here render no past reasoning).
"""

from __future__ import annotations

from typing import Any

import orjson

from modelyard.api.anthropic.schema import (
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ThinkingAdaptive,
    ThinkingDisabled,
    ThinkingEnabled,
    ToolResultBlock,
    ToolUseBlock,
)
from modelyard.providers.base import ChatRequest
from modelyard.sampling import Sampling
from modelyard.usage import Usage

TOOL_ERROR_PREFIX = "Error: "
"""Put before a `tool_result` marked `is_error` (chat messages have no such flag)."""

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "content_filter": "refusal"}


def chat_messages(payload: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as the chat route's template dicts."""
    messages: list[dict[str, Any]] = []
    if payload.system is not None:
        system = payload.system if isinstance(payload.system, str) else "\n".join(
            block.text for block in payload.system)
        messages.append({"role": "system", "content": system})
    for message in payload.messages:
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in message.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append({"id": block.id, "type": "function", "function": {
                    "name": block.name, "arguments": orjson.dumps(block.input).decode()}})
            elif isinstance(block, ToolResultBlock):
                text = block.text()
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                 "content": TOOL_ERROR_PREFIX + text if block.is_error
                                 else text})
        if message.role == "assistant":
            if texts or calls:
                entry: dict[str, Any] = {"role": "assistant",
                                         "content": "\n".join(texts) if texts else None}
                if calls:
                    entry["tool_calls"] = calls
                messages.append(entry)
        elif texts:
            messages.append({"role": "user", "content": "\n".join(texts)})
    return messages


def chat_tools(payload: CountTokensRequest) -> list[dict[str, Any]]:
    """Anthropic's tools as OpenAI function tools."""
    tools: list[dict[str, Any]] = []
    for tool in payload.tools or ():
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        tools.append({"type": "function", "function": function})
    return tools


def chat_tool_choice(payload: CountTokensRequest) -> tuple[str | dict[str, Any] | None, bool]:
    """OpenAI's tool_choice for Anthropic's, and whether calls may run in parallel."""
    choice = payload.tool_choice
    if choice is None or not payload.tools:
        return (None if choice is None or choice.type != "none" else "none"), True
    parallel = choice.disable_parallel_tool_use is not True
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel


def thinking_fields(payload: CountTokensRequest) -> tuple[bool | None, int | None]:
    """(enable_thinking, thinking_budget): none given, the model's default."""
    if isinstance(payload.thinking, ThinkingEnabled):
        return True, payload.thinking.budget_tokens
    if isinstance(payload.thinking, ThinkingDisabled):
        return False, None
    if isinstance(payload.thinking, ThinkingAdaptive):
        return True, None
    return None, None


EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
"""Anthropic's output_config.effort as the core's reasoning_effort."""


def output_fields(payload: MessagesRequest) -> tuple[dict[str, Any] | None, str | None]:
    """(response_format, reasoning_effort) from `output_config`."""
    config = payload.output_config
    if config is None:
        return None, None
    response_format = None if config.format is None else {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": config.format.schema_, "strict": True}}
    return response_format, None if config.effort is None else EFFORTS[config.effort]


def to_chat_request(payload: MessagesRequest, request_id: str, account_id: str | None,
                    report_stop: bool) -> ChatRequest:
    """The request on the chat core. `report_stop`: ask for the matched stop string at the
    end of the text (`stop_reason` names it; see `split_stop`), for a model whose engine
    can include it."""
    tool_choice, parallel = chat_tool_choice(payload)
    enable_thinking, thinking_budget = thinking_fields(payload)
    response_format, reasoning_effort = output_fields(payload)
    stop = tuple(payload.stop_sequences or ())
    return ChatRequest(
        request_id=request_id,
        cache_scope=account_id,
        messages=chat_messages(payload),
        max_tokens=payload.max_tokens,
        sampling=Sampling(temperature=payload.temperature, top_p=payload.top_p,
                          top_k=payload.top_k),
        stop=stop,
        include_stop_str_in_output=bool(stop) and report_stop,
        tools=chat_tools(payload),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        response_format=response_format,
        enable_thinking=enable_thinking,
        thinking_budget=thinking_budget,
        reasoning_effort=reasoning_effort,
        stream=payload.stream,
        truncate_to_context=True,
    )


def split_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """The text without the stop string it ends with, and that stop string. The engine
    stops at the earliest match and ends the text with it, so the longest stop string the
    text ends with is the one it matched."""
    matched = max((stop for stop in stops if text.endswith(stop)), key=len, default=None)
    return (text[:-len(matched)] if matched else text), matched


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    if stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def anthropic_usage(usage: Usage) -> dict[str, int]:
    """Anthropic counts input tokens read from the cache apart from `input_tokens`."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_tokens}


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's JSON arguments as the `input` object (an empty object for none; anything
    that is no JSON object under `arguments`, so nothing is lost)."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}
