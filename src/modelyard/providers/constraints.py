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
    """One schema for a call of any (or only the named) declared function. Each function's
    `parameters` sits under `arguments` of its option, so definitions its references point
    at (`$defs`, `definitions`) move to the combined schema's root, renamed per function,
    and every local `$ref` is rewritten to match."""
    options: list[dict[str, Any]] = []
    definitions: dict[str, Any] = {}
    tools = [tool["function"] for tool in request.tools
             if only is None or tool["function"]["name"] == only]
    for index, function in enumerate(tools):
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        at = ["properties", "arguments"] if len(tools) == 1 else [
            "anyOf", str(index), "properties", "arguments"]
        parameters = _hoist_definitions(parameters, at, f"{index}.{function['name']}.",
                                        definitions)
        options.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    if definitions:
        schema = {**schema, "$defs": definitions}
    return schema


_DEFINITION_KEYS = ("$defs", "definitions")


def _hoist_definitions(parameters: dict[str, Any], at: list[str], prefix: str,
                       definitions: dict[str, Any]) -> dict[str, Any]:
    """`parameters` without its root definitions, which go to `definitions` named
    `prefix + name`; local references rewritten for the schema's new place `at`."""

    def pointer(reference: str) -> str:
        if reference != "#" and not reference.startswith("#/"):
            return reference  # an anchor or another document: left as written
        parts = [_unescape(part) for part in reference[2:].split("/")] if reference != "#" \
            else []
        if len(parts) >= 2 and parts[0] in _DEFINITION_KEYS:
            parts = ["$defs", _hoisted_name(prefix, parts[0], parts[1]), *parts[2:]]
        else:
            parts = [*at, *parts]
        return "#" + "".join("/" + _escape(part) for part in parts)

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: (pointer(value) if key == "$ref" and isinstance(value, str)
                          else rewrite(value)) for key, value in node.items()}
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    for key in _DEFINITION_KEYS:
        held = parameters.get(key)
        if isinstance(held, dict):
            for name, definition in held.items():
                definitions[_hoisted_name(prefix, key, name)] = rewrite(definition)
    result: dict[str, Any] = rewrite({key: value for key, value in parameters.items()
                                      if key not in _DEFINITION_KEYS
                                      or not isinstance(value, dict)})
    return result


def _hoisted_name(prefix: str, key: str, name: str) -> str:
    return f"{prefix}{name}" if key == "$defs" else f"{prefix}{key}.{name}"


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


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
                try:
                    constraint = _tool_constraint(request, grammar, tool_tokens, choice)
                except GrammarError as exc:
                    raise ProviderError(422, f"cannot enforce the tools' parameters: {exc}",
                                        param="tools", code="unsupported_schema") from exc
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
