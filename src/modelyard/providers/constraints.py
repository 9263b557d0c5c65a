"""From a request's tools, response_format and reasoning fields to what the engine enforces.

- `response_format`: json_object and json_schema become grammars (constrained decoding).
- `tools` are rendered by the chat template. `tool_choice: "auto"` constrains a call only
  once the model opens one (a lazy grammar triggered by the opening tag's token), and lets
  it open several unless `parallel_tool_calls` is false; `"required"` and a named function
  constrain the whole output to one call; `"none"` bans the opening tag.
- reasoning: `enable_thinking` goes to the template; `reasoning_effort` maps to a thinking
  budget (see `EFFORT_BUDGETS`); `thinking_budget` wins when both are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelyard.chat.reasoning import EFFORT_BUDGETS
from modelyard.engine.grammar import Constraint, GrammarCompiler, GrammarError, json_schema_lark
from modelyard.providers.base import ChatRequest, ProviderError


@dataclass(frozen=True)
class ToolTokens:
    """The special tokens that open and close a tool call in the model's vocabulary."""

    open_id: int
    close_id: int


@dataclass(frozen=True)
class Plan:
    constraint: Constraint | None = None
    banned_tokens: tuple[int, ...] = ()
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    parse_tools: bool = False
    thinking: bool | None = None
    """None: the model's default; False: thinking switched off."""
    thinking_budget: int | None = None


def _function_names(request: ChatRequest) -> list[str]:
    return [tool["function"]["name"] for tool in request.tools]


def _call_schema(request: ChatRequest, only: str | None) -> dict[str, Any]:
    options = []
    for tool in request.tools:
        function = tool["function"]
        if only is not None and function["name"] != only:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    return options[0] if len(options) == 1 else {"anyOf": options}


def _tool_constraint(request: ChatRequest, grammar: GrammarCompiler, tokens: ToolTokens,
                     choice: str | dict[str, Any]) -> Constraint | None:
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if named is not None and named not in _function_names(request):
        raise ProviderError(422, f"tool_choice names '{named}', which is not among the tools",
                            param="tool_choice", code="invalid_value")
    body = f'"\\n" {json_schema_lark(_call_schema(request, named))} "\\n" <[{tokens.close_id}]>'
    if choice == "auto":
        return grammar.lark(f"start: {body}", trigger_token=tokens.open_id,
                            stop_after=not request.parallel_tool_calls)
    # "required" and a named function: exactly one call, so the turn always ends in a
    # complete, valid call (a grammar that allowed more let small models repeat calls until
    # max_tokens cut one in half).
    return grammar.lark(f"start: <[{tokens.open_id}]> {body}")


def plan(request: ChatRequest, grammar: GrammarCompiler | None,
         tool_tokens: ToolTokens | None, thinks: bool) -> Plan:
    """What to render, constrain and parse for this request; ProviderError if impossible."""
    constraint: Constraint | None = None
    banned: tuple[int, ...] = ()
    kwargs: dict[str, Any] = {}
    parse_tools = False
    try:
        fmt = request.response_format or {"type": "text"}
        if fmt.get("type") in ("json_object", "json_schema") and grammar is None:
            raise ProviderError(422, "this model cannot enforce response_format",
                                param="response_format", code="unsupported_parameter")
        if grammar is not None and fmt.get("type") == "json_object":
            constraint = grammar.json_object()
        elif grammar is not None and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            constraint = grammar.json_schema(spec.get("schema") or {},
                                             strict=bool(spec.get("strict")))
        if request.tools:
            kwargs["tools"] = request.tools
            choice = request.tool_choice or "auto"
            if tool_tokens is None or grammar is None:
                if choice not in ("auto", "none"):
                    raise ProviderError(422, "this model cannot be made to call tools",
                                        param="tool_choice", code="unsupported_parameter")
            elif choice == "none":
                banned = (tool_tokens.open_id,)
            elif constraint is None or choice != "auto":
                constraint = _tool_constraint(request, grammar, tool_tokens, choice)
            parse_tools = choice != "none"
    except GrammarError as exc:
        raise ProviderError(422, f"cannot enforce this schema: {exc}",
                            param="response_format", code="unsupported_schema") from exc
    thinking, budget = _reasoning(request, thinks)
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    return Plan(constraint, banned, kwargs, parse_tools, thinking, budget)


def _reasoning(request: ChatRequest, thinks: bool) -> tuple[bool | None, int | None]:
    if not thinks:
        return None, None  # a model with no thinking ignores these fields
    thinking = request.enable_thinking
    budget = request.thinking_budget
    if request.reasoning_effort is not None:
        effort_budget = EFFORT_BUDGETS[request.reasoning_effort]
        if effort_budget is None:
            thinking = False if thinking is None else thinking
        elif budget is None:
            budget = effort_budget
    return thinking, (budget if thinking is not False else None)
