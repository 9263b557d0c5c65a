"""A deployment of kind "anthropic": Anthropic's Messages API (`POST {base_url}/messages`,
`x-api-key` and `anthropic-version`), spoken natively.

The request: system and developer messages become `system` text blocks; user, assistant
and tool messages become `messages` (consecutive turns of one role merged, as tool
results of parallel calls must be), with images as `image` blocks, assistant tool calls
as `tool_use` blocks and tool messages as `tool_result` blocks; tools with
`input_schema`, tool_choice (`auto`, `any`, `tool`, `none`, with
`disable_parallel_tool_use`), stop_sequences, temperature (0 to 1), top_p, top_k,
max_tokens, `thinking` (a budget) and a json_schema response format as
`output_config.format`. Refused with a 422 unless the model drops them: n > 1, seed,
logit_bias, logprobs, the penalties, min_p, response_format json_object, a temperature
above 1 (clamped to 1 when dropped).

The answer, streamed (`message_start`, `content_block_*`, `message_delta`,
`message_stop`, `ping`, `error` events) or whole (a `message`), is read into `ChatDelta`s:
text, `thinking` blocks as reasoning, `tool_use` blocks as tool calls (their
`input_json_delta` fragments as argument fragments), stop reasons as OpenAI's finish
reasons, and usage (`input_tokens` plus the cache's reads and writes as the prompt,
`cache_read_input_tokens` as its cached part). Failures are the OpenAI deployments'
(`openai_compat`): 429 and 529 (overloaded) are retried elsewhere, Retry-After honoured.

`AnthropicRelay` serves `POST /v1/messages` for a model whose deployments are Anthropic's,
with no round trip through Chat Completions: the client's own body goes upstream under the
deployment's model name (`RoutedModel.prepare_native`), with the chat path's routing,
retries, breakers and reservation, and the answer's bytes come back as they were written
(streamed events one by one; the whole `message`), only its `model` set back to the name
the client asked for; the usage is read on the way for the bill.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from modelyard.providers.base import ChatRequest, ToolCallDelta
from modelyard.providers.http1 import Response
from modelyard.providers.native_request import (
    Image,
    Unsupported,
    arguments,
    parts,
    refused,
    text_of,
    thinking_budget,
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
from modelyard.usage import Usage

ANTHROPIC_VERSION = "2023-06-01"
API = "Anthropic's Messages API"
SAMPLING = frozenset({"temperature", "top_p", "top_k"})

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "pause_turn": "stop", "refusal": "content_filter",
                "model_context_window_exceeded": "length"}
"""Anthropic's stop_reason as OpenAI's finish_reason (anything else: "stop")."""


class AnthropicDeployment(UpstreamDeployment):
    """One `[[models.deployments]]` entry of kind "anthropic"."""

    def key_headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def build(self, request: ChatRequest, model: str, max_tokens: int, defaults: Sampling,
              drop_unsupported: bool) -> UpstreamCall:
        body = messages_body(request, model, max_tokens, defaults, drop_unsupported)
        return UpstreamCall("messages", body, request.stream)

    async def send(self, call: UpstreamCall, prompt_estimate: int,
                   on_end: Callable[[bool], None], request_id: str = "") -> UpstreamStream:
        def reader(response: Response) -> UpstreamStream:
            if call.relay_as is not None:
                return AnthropicRelay(response, prompt_estimate, on_end, model=call.relay_as,
                                      request_id=request_id, deployment=self.name)
            return AnthropicStream(response, prompt_estimate, on_end, request_id=request_id,
                                   deployment=self.name)
        return await self.exchange(call.path, orjson.dumps(call.body), call.stream, reader)


def messages_body(request: ChatRequest, model: str, max_tokens: int, defaults: Sampling,
                  drop_unsupported: bool = False) -> dict[str, Any]:
    """The Messages API body for `request`; ProviderError (422) for what it cannot say."""
    unsupported = Unsupported(API, drop_unsupported)
    unsupported.common(request, SAMPLING)
    if request.n != 1:
        unsupported.add("n")
    if request.seed is not None:
        unsupported.add("seed")
    output_format = _output_format(request.response_format)
    if output_format is None and request.response_format is not None \
            and request.response_format.get("type") != "text":
        unsupported.add("response_format")  # json_object: no schema to give
    budget = thinking_budget(request)
    # Extended thinking takes no temperature or top_k and a top_p of 0.95 or more: with
    # it on, the model's defaults are not sent (the request's own fields still are).
    sampling = request.sampling if budget else request.sampling_over(defaults)
    temperature = sampling.temperature
    if temperature is not None and temperature > 1:
        if request.sampling.temperature is not None and not drop_unsupported:
            raise refused("this model's temperature is at most 1 (its deployment speaks "
                          f"{API})", "temperature")
        temperature = 1.0
    unsupported.check()
    system, messages = _messages(request.messages)
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": messages}
    if system:
        body["system"] = system
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if temperature is not None:
        body["temperature"] = temperature
    if sampling.top_p is not None:
        body["top_p"] = sampling.top_p
    if sampling.top_k is not None and sampling.top_k > 0:
        body["top_k"] = sampling.top_k
    if request.tools:
        body["tools"] = [_tool(tool["function"]) for tool in request.tools]
    choice = _tool_choice(request)
    if choice is not None:
        body["tool_choice"] = choice
    if budget == 0:
        body["thinking"] = {"type": "disabled"}
    elif budget is not None:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if output_format is not None:
        body["output_config"] = {"format": output_format}
    body["stream"] = request.stream
    return body


def _output_format(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """A json_schema response format as structured output's `output_config.format`."""
    if not response_format or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    return {"type": "json_schema", "schema": schema} if schema else None


def _messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                       list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, param = message["role"], f"messages[{i}]"
        content = message.get("content")
        blocks: list[dict[str, Any]]
        if role in ("system", "developer"):
            text = text_of(content, f"{param}.content")
            if text:
                system.append({"type": "text", "text": text})
            continue
        if role == "user":
            blocks = [_block(part) for part in parts(content, f"{param}.content")]
        elif role == "assistant":
            blocks = [{"type": "text", "text": text_of(content, f"{param}.content")}]
            if not blocks[0]["text"]:
                blocks = []
            for j, call in enumerate(message.get("tool_calls") or ()):
                function = call["function"]
                blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"],
                               "input": arguments(function.get("arguments"),
                                                  f"{param}.tool_calls[{j}]")})
        else:  # tool
            role = "user"
            blocks = [{"type": "tool_result", "tool_use_id": message.get("tool_call_id", ""),
                       "content": text_of(content, f"{param}.content")}]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # a turn of one text is sent as a string
        blocks = turn["content"]
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            turn["content"] = blocks[0]["text"]
        elif not blocks:
            turn["content"] = ""
    return system, turns


def _block(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if part.url:
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    return {"type": "image", "source": {"type": "base64", "media_type": part.media_type,
                                        "data": part.data}}


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        tool["description"] = function["description"]
    tool["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return tool


def _tool_choice(request: ChatRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    result: dict[str, Any] | None
    if choice is None:
        result = {"type": "auto"} if request.tools and not request.parallel_tool_calls else None
    elif isinstance(choice, dict):
        result = {"type": "tool", "name": choice["function"]["name"]}
    else:
        result = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    if result is not None and not request.parallel_tool_calls and result["type"] != "none":
        result["disable_parallel_tool_use"] = True
    return result


@dataclass
class _Block:
    kind: str
    call: int = -1
    """Its tool call's index among the answer's calls (a tool_use block)."""
    has_input: bool = False


class AnthropicStream(UpstreamStream):
    """An Anthropic answer (its events, or one `message`) read as deltas of choice 0."""

    def __init__(self, response: Response, prompt_estimate: int,
                 on_end: Callable[[bool], None], *, request_id: str = "",
                 deployment: str = "") -> None:
        super().__init__(response, prompt_estimate, on_end, request_id=request_id,
                         deployment=deployment)
        self._blocks: dict[int, _Block] = {}
        self._calls = 0

    def _read_chunk(self, chunk: dict[str, Any]) -> None:
        kind = chunk.get("type")
        if kind == "message":
            self._whole(chunk)
        elif kind == "message_start":
            self._prompt_usage(_object(_object(chunk.get("message"), "message").get("usage"),
                                       "usage"))
        elif kind == "content_block_start":
            self._start(_count(chunk.get("index"), "a block's index"),
                        _object(chunk.get("content_block"), "content_block"))
        elif kind == "content_block_delta":
            self._delta_of(_count(chunk.get("index"), "a block's index"),
                           _object(chunk.get("delta"), "delta"))
        elif kind == "content_block_stop":
            block = self._blocks.get(_count(chunk.get("index"), "a block's index"))
            if block is not None and block.kind == "tool_use" and not block.has_input:
                self._emit(calls=(ToolCallDelta(block.call, "", "", "{}"),))
        elif kind == "message_delta":
            delta = _object(chunk.get("delta"), "delta")
            self._final_usage(_object(chunk.get("usage"), "usage"))
            self._finish(delta.get("stop_reason"))
        elif kind == "message_stop":
            self._done = True
        elif kind is None:
            raise Malformed("an event without a type")
        # ping, and event types added later: nothing to read

    def _start(self, index: int, block: dict[str, Any]) -> None:
        kind = _text(block.get("type"), "a block's type")
        state = self._blocks[index] = _Block(kind)
        if kind == "text":
            self._emit(text=_text(block.get("text"), "text"))
        elif kind == "thinking":
            self._emit(reasoning=_text(block.get("thinking"), "thinking"))
        elif kind == "tool_use":
            state.call, self._calls = self._calls, self._calls + 1
            given = _object(block.get("input"), "a tool_use block's input")
            state.has_input = bool(given)
            self._emit(calls=(ToolCallDelta(
                state.call, _text(block.get("id"), "a tool_use block's id"),
                _text(block.get("name"), "a tool_use block's name"),
                orjson.dumps(given).decode() if given else ""),))

    def _delta_of(self, index: int, delta: dict[str, Any]) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            self._emit(text=_text(delta.get("text"), "text"))
        elif kind == "thinking_delta":
            self._emit(reasoning=_text(delta.get("thinking"), "thinking"))
        elif kind == "input_json_delta":
            block = self._blocks.get(index)
            if block is None or block.kind != "tool_use":
                raise Malformed("input_json_delta outside a tool_use block")
            fragment = _text(delta.get("partial_json"), "partial_json")
            block.has_input = block.has_input or bool(fragment)
            self._emit(calls=(ToolCallDelta(block.call, "", "", fragment),))
        # signature_delta, citations_delta: nothing OpenAI's shape holds

    def _whole(self, message: dict[str, Any]) -> None:
        content = message.get("content") or []
        if not isinstance(content, list):
            raise Malformed("content is not a list")
        for index, raw in enumerate(content):
            self._start(index, _object(raw, "a content block"))
            block = self._blocks[index]
            if block.kind == "tool_use" and not block.has_input:
                self._emit(calls=(ToolCallDelta(block.call, "", "", "{}"),))
        usage = _object(message.get("usage"), "usage")
        self._prompt_usage(usage)
        self._final_usage(usage)
        self._finish(message.get("stop_reason"))

    def _emit(self, *, text: str = "", reasoning: str = "",
              calls: tuple[ToolCallDelta, ...] = ()) -> None:
        if self.estimated:
            self.completion_tokens += (token_bound(text) + token_bound(reasoning)
                                       + sum(token_bound(c.arguments) for c in calls))
        if text or reasoning or calls:
            self._pending.append(self._delta(0, text=text, reasoning=reasoning,
                                             tool_calls=calls))

    def _finish(self, reason: Any) -> None:
        if reason is not None:
            stop = _text(reason, "stop_reason")
            self._pending.append(self._delta(0, finish_reason=STOP_REASONS.get(stop, "stop")))

    def _prompt_usage(self, usage: dict[str, Any]) -> None:
        """The prompt's counts (message_start): Anthropic's input_tokens leave out what
        the cache read or wrote."""
        if usage.get("input_tokens") is None:
            return
        read = _count(usage.get("cache_read_input_tokens"), "cache_read_input_tokens")
        self.prompt_tokens = (_count(usage["input_tokens"], "input_tokens") + read
                              + _count(usage.get("cache_creation_input_tokens"),
                                       "cache_creation_input_tokens"))
        self.cached_tokens = read

    def _final_usage(self, usage: dict[str, Any]) -> None:
        """message_delta's cumulative counts: the completion's are final."""
        if usage.get("output_tokens") is None:
            return
        self._prompt_usage(usage)
        self.completion_tokens = _count(usage["output_tokens"], "output_tokens")
        self.estimated = False


class AnthropicRelay(AnthropicStream):
    """An answer relayed as it came. Streamed: `events()` yields each upstream event's
    bytes; whole: `message` is the answer's body."""

    def __init__(self, response: Response, prompt_estimate: int,
                 on_end: Callable[[bool], None], *, model: str, request_id: str = "",
                 deployment: str = "") -> None:
        super().__init__(response, prompt_estimate, on_end, request_id=request_id,
                         deployment=deployment)
        self._model = model
        self._raw: deque[bytes] = deque()
        self._event_bytes = b""
        self._draining = False
        self.message: dict[str, Any] | None = None
        """The whole answer (a non-streamed request), its model set back."""

    @property
    def usage(self) -> Usage:
        """The counts so far (final once `estimated` is false)."""
        return self._usage()

    async def events(self) -> AsyncIterator[bytes]:
        """The events' bytes, in order, each as one SSE event; a failure of the upstream
        raises the stream's `StreamError` (the detail is logged)."""
        while True:
            if self._raw:
                yield self._raw.popleft()
                continue
            self._pending.clear()  # the deltas are not wanted here, only the counts
            if self._done:
                break
            try:
                await self._read_event()
            except Exception as exc:  # whatever the upstream did: the stream's error
                self._done = True
                self._raw.clear()
                await self._end(failed=True)
                raise self.failure(exc) from None
        await self._end(failed=False)

    async def drain_usage(self, seconds: float) -> Usage | None:
        self._draining = True  # nobody reads the events any more: keep none
        self._raw.clear()
        return await super().drain_usage(seconds)

    def _event(self, event: bytes) -> bool:
        self._event_bytes = event + b"\n\n"
        carried = super()._event(event)
        if carried and not self._draining:
            self._raw.append(self._event_bytes)
        return carried

    def _read_chunk(self, chunk: dict[str, Any]) -> None:
        super()._read_chunk(chunk)
        kind = chunk.get("type")
        if kind == "message":
            self.message = {**chunk, "model": self._model}
        elif kind == "message_start" and isinstance(chunk.get("message"), dict):
            chunk["message"]["model"] = self._model
            self._event_bytes = (b"event: message_start\ndata: " + orjson.dumps(chunk)
                                 + b"\n\n")
