"""A deployment of kind "gemini": Google's Gemini API (`models/{model}:generateContent`,
or `:streamGenerateContent?alt=sse` for a stream, with `x-goog-api-key`), spoken
natively.

The request: system and developer messages become `systemInstruction`; the others
`contents` of role `user` or `model` (consecutive turns of one role merged), with images
as `inlineData` (data URLs) or `fileData` (URLs), assistant tool calls as `functionCall`
parts and tool messages as `functionResponse` parts (named after the call they answer);
`generationConfig` with temperature, topP, topK, the penalties, maxOutputTokens,
stopSequences, candidateCount (n), seed, responseMimeType + responseSchema (json_object,
json_schema: `gemini_schema`) and `thinkingConfig` (a budget, thoughts included); tools as
`functionDeclarations`, tool_choice as `toolConfig`. Refused with a 422 unless the model
drops them: logit_bias, logprobs, min_p, repetition_penalty, parallel_tool_calls false.

The answer, streamed (`data:` lines, one `GenerateContentResponse` each) or whole, is read
into `ChatDelta`s: text parts, `thought` parts as reasoning, `functionCall` parts as whole
tool calls, finish reasons as OpenAI's (`STOP` after a call: `tool_calls`; the safety
family: `content_filter`; a blocked prompt: `content_filter`), and `usageMetadata` (the
prompt and its cached part, completion = candidates + thoughts, thoughts as reasoning),
taken as final once every candidate has finished.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import orjson

from modelyard.providers.base import ChatRequest, ToolCallDelta
from modelyard.providers.gemini_schema import gemini_schema
from modelyard.providers.http1 import Response
from modelyard.providers.native_request import (
    Image,
    Unsupported,
    arguments,
    parts,
    refused,
    text_of,
    thinking_budget,
    tool_names,
)
from modelyard.providers.openai_compat import UpstreamCall, UpstreamDeployment
from modelyard.providers.upstream_stream import (
    Malformed,
    UpstreamStream,
    _count,
    _object,
    _text,
    token_bound,
)
from modelyard.sampling import Sampling

API = "the Gemini API"
SAMPLING = frozenset({"temperature", "top_p", "top_k", "frequency_penalty",
                      "presence_penalty"})
_CONFIG_NAMES = {"temperature": "temperature", "top_p": "topP",
                 "frequency_penalty": "frequencyPenalty", "presence_penalty": "presencePenalty"}

FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                  "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                  "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
                  "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter"}
"""Gemini's finishReason as OpenAI's finish_reason (anything else: "stop")."""


class GeminiDeployment(UpstreamDeployment):
    """One `[[models.deployments]]` entry of kind "gemini"."""

    def key_headers(self, api_key: str | None) -> dict[str, str]:
        return {"x-goog-api-key": api_key} if api_key else {}

    def build(self, request: ChatRequest, model: str, max_tokens: int, defaults: Sampling,
              drop_unsupported: bool) -> UpstreamCall:
        body = generate_body(request, max_tokens, defaults, drop_unsupported)
        name = quote(model.removeprefix("models/"), safe="-._~")
        path = (f"models/{name}:streamGenerateContent?alt=sse" if request.stream
                else f"models/{name}:generateContent")
        return UpstreamCall(path, body, request.stream)

    async def send(self, call: UpstreamCall, prompt_estimate: int,
                   on_end: Callable[[bool], None], request_id: str = "") -> UpstreamStream:
        choices = call.body.get("generationConfig", {}).get("candidateCount", 1)

        def reader(response: Response) -> UpstreamStream:
            return GeminiStream(response, prompt_estimate, on_end, request_id=request_id,
                                deployment=self.name, choices=choices)
        return await self.exchange(call.path, orjson.dumps(call.body), call.stream, reader)


def generate_body(request: ChatRequest, max_tokens: int, defaults: Sampling,
                  drop_unsupported: bool = False) -> dict[str, Any]:
    """The generateContent body for `request`; ProviderError (422) for what it cannot
    say."""
    unsupported = Unsupported(API, drop_unsupported)
    unsupported.common(request, SAMPLING)
    if request.tools and not request.parallel_tool_calls:
        unsupported.add("parallel_tool_calls")
    unsupported.check()
    system, contents = _contents(request.messages)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    config: dict[str, Any] = {}
    sampling = request.sampling_over(defaults)
    for name, wire in _CONFIG_NAMES.items():
        value = getattr(sampling, name)
        if value is not None:
            config[wire] = value
    if sampling.top_k is not None and sampling.top_k > 0:
        config["topK"] = sampling.top_k
    config["maxOutputTokens"] = max_tokens
    if request.stop:
        config["stopSequences"] = list(request.stop)
    if request.n != 1:
        config["candidateCount"] = request.n
    if request.seed is not None:
        config["seed"] = request.seed
    _response_format(request.response_format, config)
    budget = thinking_budget(request)
    if budget == 0:
        config["thinkingConfig"] = {"thinkingBudget": 0}
    elif budget is not None:
        config["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": True}
    body["generationConfig"] = config
    if request.tools:
        body["tools"] = [{"functionDeclarations": [
            _declaration(tool["function"], f"tools[{i}].function.parameters")
            for i, tool in enumerate(request.tools)]}]
    tool_config = _tool_config(request.tool_choice)
    if tool_config is not None:
        body["toolConfig"] = {"functionCallingConfig": tool_config}
    return body


def _contents(messages: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names = tool_names(messages)
    for i, message in enumerate(messages):
        role, param = message["role"], f"messages[{i}]"
        content = message.get("content")
        wire: list[dict[str, Any]]
        if role in ("system", "developer"):
            text = text_of(content, f"{param}.content")
            if text:
                system.append(text)
            continue
        if role == "user":
            wire = [_part(part) for part in parts(content, f"{param}.content")]
        elif role == "assistant":
            role = "model"
            text = text_of(content, f"{param}.content")
            wire = [{"text": text}] if text else []
            for j, call in enumerate(message.get("tool_calls") or ()):
                function = call["function"]
                wire.append({"functionCall": {
                    "name": function["name"],
                    "args": arguments(function.get("arguments"), f"{param}.tool_calls[{j}]")}})
        else:  # tool: the answer to a call, named after it
            role = "user"
            name = names.get(message.get("tool_call_id") or "") or message.get("name")
            if not name:
                raise refused("a tool message must answer a tool call of an earlier "
                              "assistant message (tool_call_id)", f"{param}.tool_call_id")
            wire = [{"functionResponse": {"name": name, "response": _response(
                text_of(content, f"{param}.content"))}}]
        if not wire:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(wire)
        else:
            contents.append({"role": role, "parts": wire})
    return system, contents


def _part(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"text": part}
    if part.url:
        return {"fileData": {"mimeType": part.media_type, "fileUri": part.url}}
    return {"inlineData": {"mimeType": part.media_type, "data": part.data}}


def _response(text: str) -> dict[str, Any]:
    """A tool's result as functionResponse.response (an object): a JSON object as it is,
    anything else under "result"."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"result": text}


def _response_format(response_format: dict[str, Any] | None, config: dict[str, Any]) -> None:
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return
    config["responseMimeType"] = "application/json"
    schema = (response_format or {}).get("json_schema", {}).get("schema")
    if kind == "json_schema" and schema:
        config["responseSchema"] = gemini_schema(schema, "response_format.json_schema.schema")


def _declaration(function: dict[str, Any], param: str) -> dict[str, Any]:
    declaration: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        declaration["description"] = function["description"]
    parameters = function.get("parameters")
    if parameters and parameters.get("properties"):  # Gemini refuses an empty object
        declaration["parameters"] = gemini_schema(parameters, param)
    return declaration


def _tool_config(choice: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, dict):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    return {"mode": {"auto": "AUTO", "required": "ANY", "none": "NONE"}[choice]}


class GeminiStream(UpstreamStream):
    """A Gemini answer (its `data:` events, or one whole response) read as deltas."""

    def __init__(self, response: Response, prompt_estimate: int,
                 on_end: Callable[[bool], None], *, request_id: str = "",
                 deployment: str = "", choices: int = 1) -> None:
        super().__init__(response, prompt_estimate, on_end, request_id=request_id,
                         deployment=deployment, choices=choices)
        self._calls = [0] * choices
        self._finished: set[int] = set()
        self._whole = False

    def read_whole(self, raw: bytes) -> None:
        self._whole = True
        super().read_whole(raw)

    def _read_chunk(self, chunk: dict[str, Any]) -> None:
        candidates = chunk.get("candidates")
        if candidates is not None and not isinstance(candidates, list):
            raise Malformed("candidates is not a list")
        feedback = _object(chunk.get("promptFeedback"), "promptFeedback")
        if not candidates and feedback.get("blockReason"):  # the prompt itself was blocked
            for index in range(self._choices):
                if index not in self._finished:
                    self._finished.add(index)
                    self._pending.append(self._delta(index, finish_reason="content_filter"))
        for raw in candidates or ():
            self._candidate(_object(raw, "a candidate"))
        usage = chunk.get("usageMetadata")
        if usage is not None and (self._whole or len(self._finished) >= self._choices):
            self._usage_of(_object(usage, "usageMetadata"))

    def _candidate(self, candidate: dict[str, Any]) -> None:
        index = _count(candidate.get("index"), "a candidate's index")
        if index >= self._choices:
            raise Malformed(f"candidate index {index} of a request for {self._choices}")
        content = _object(candidate.get("content"), "a candidate's content")
        raw_parts = content.get("parts") or []
        if not isinstance(raw_parts, list):
            raise Malformed("parts is not a list")
        for raw in raw_parts:
            part = _object(raw, "a part")
            if "functionCall" in part:
                call = _object(part["functionCall"], "functionCall")
                args = _object(call.get("args"), "functionCall.args")
                self._emit(index, calls=(ToolCallDelta(
                    self._calls[index], _text(call.get("id"), "functionCall.id")
                    or f"call_{secrets.token_hex(12)}",
                    _text(call.get("name"), "functionCall.name"),
                    orjson.dumps(args).decode()),))
                self._calls[index] += 1
            elif part.get("thought") is True:
                self._emit(index, reasoning=_text(part.get("text"), "a thought's text"))
            elif "text" in part:
                self._emit(index, text=_text(part.get("text"), "a part's text"))
            # inlineData, executableCode, ...: nothing OpenAI's shape holds
        reason = candidate.get("finishReason")
        if reason is not None and index not in self._finished:
            reason = _text(reason, "finishReason")
            finish = FINISH_REASONS.get(reason, "stop")
            if finish == "stop" and self._calls[index]:
                finish = "tool_calls"
            self._finished.add(index)
            if self.estimated:
                self.completion_tokens += 1
            self._pending.append(self._delta(index, finish_reason=finish))

    def _emit(self, index: int, *, text: str = "", reasoning: str = "",
              calls: tuple[ToolCallDelta, ...] = ()) -> None:
        if self.estimated:
            self.completion_tokens += (token_bound(text) + token_bound(reasoning)
                                       + sum(token_bound(c.arguments) for c in calls))
        if text or reasoning or calls:
            self._pending.append(self._delta(index, text=text, reasoning=reasoning,
                                             tool_calls=calls))

    def _usage_of(self, usage: dict[str, Any]) -> None:
        if usage.get("promptTokenCount") is None:
            return
        prompt = (_count(usage["promptTokenCount"], "promptTokenCount")
                  + _count(usage.get("toolUsePromptTokenCount"), "toolUsePromptTokenCount"))
        thoughts = _count(usage.get("thoughtsTokenCount"), "thoughtsTokenCount")
        self.prompt_tokens = prompt
        self.cached_tokens = min(prompt, _count(usage.get("cachedContentTokenCount"),
                                                "cachedContentTokenCount"))
        self.completion_tokens = _count(usage.get("candidatesTokenCount"),
                                        "candidatesTokenCount") + thoughts
        self.reasoning_tokens = thoughts
        self.estimated = False
        self._pending.append(self._counts())
