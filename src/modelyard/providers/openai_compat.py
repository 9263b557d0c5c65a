"""An upstream deployment: one OpenAI-compatible server (vLLM, SGLang, llama-server,
Ollama, a hosted provider), reached with its own pooled `httpx.AsyncClient`.

The upstream is always asked to stream, with usage. `open` sends the request and waits
for the first event, so every failure up to there (connection errors, timeouts, 429, 5xx,
malformed JSON) is an `UpstreamError` that the router may retry on another deployment.
What follows is an `UpstreamStream` of `ChatDelta`s, one upstream event at a time;
failures there are `StreamError`s, never retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson

from modelyard.config import DeploymentConfig
from modelyard.providers.base import ChatDelta, StreamError, ToolCallDelta
from modelyard.providers.profiles import reasoning_of

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
"""The estimate used when an upstream reports no usage: one token per 4 characters."""


def estimate_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


class UpstreamError(Exception):
    """A failure before the first event: `retriable` ones may go to another deployment."""

    def __init__(self, status: int, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retriable = retriable


class UpstreamDeployment:
    """One `[[models.deployments]]` entry of kind "openai"."""

    def __init__(self, config: DeploymentConfig, api_key: str | None) -> None:
        self.config = config
        self.name = config.name or f"{config.base_url}#{config.upstream_model or ''}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(connect=config.connect_timeout,
                                read=config.first_token_timeout,
                                write=config.first_token_timeout, pool=config.connect_timeout)
        limits = httpx.Limits(max_connections=config.max_concurrency,
                              max_keepalive_connections=config.max_concurrency)
        self.client = httpx.AsyncClient(base_url=config.base_url.rstrip("/") + "/",
                                        headers=headers, timeout=timeout, limits=limits)
        self.active = 0

    @property
    def full(self) -> bool:
        return self.active >= self.config.max_concurrency

    async def open(self, body: dict[str, Any], prompt_estimate: int,
                   on_end: Callable[[bool], None]) -> UpstreamStream:
        """Send the request and read up to its first event. `on_end(failed)` is called
        once when the stream ends, whatever the way."""
        deadline = time.monotonic() + self.config.total_timeout
        request = self.client.build_request("POST", "chat/completions",
                                            content=orjson.dumps(body))
        try:
            async with asyncio.timeout(self.config.first_token_timeout):
                response = await self.client.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        raw = await response.aread()
                        raise _status_error(response.status_code, raw)
                    stream = UpstreamStream(response, prompt_estimate, deadline, on_end)
                    await stream.peek()
                except BaseException:
                    await response.aclose()
                    raise
        except TimeoutError:
            raise UpstreamError(504, f"upstream {self.name}: no first token within "
                                f"{self.config.first_token_timeout} s", retriable=True) from None
        except httpx.TimeoutException as exc:
            raise UpstreamError(504, f"upstream {self.name}: timed out ({type(exc).__name__})",
                                retriable=True) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(502, f"upstream {self.name}: {type(exc).__name__}: {exc}",
                                retriable=True) from None
        except StreamError as exc:
            raise UpstreamError(502, f"upstream {self.name}: {exc}", retriable=True) from None
        return stream

    async def close(self) -> None:
        await self.client.aclose()


def _status_error(status: int, raw: bytes) -> UpstreamError:
    message = raw[:500].decode("utf-8", "replace")
    try:
        error = orjson.loads(raw).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        elif isinstance(error, str):
            message = error
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return UpstreamError(status, f"upstream answered {status}: {message}",
                         retriable=status == 429 or status >= 500)


class UpstreamStream:
    """The upstream's events as `ChatDelta`s in SPEC.md's shape.

    Token counts are estimated as text arrives (the deltas say so with `usage_estimated`)
    until the upstream's own usage arrives; a stream that ends without usage keeps the
    estimate. Tool-call fragments are gathered per call and passed on whole when the next
    call starts or the choice finishes.
    """

    def __init__(self, response: httpx.Response, prompt_estimate: int, deadline: float,
                 on_end: Callable[[bool], None]) -> None:
        self._response = response
        self._lines: AsyncIterator[str] = response.aiter_lines()
        self._deadline = deadline
        self._on_end = on_end
        self._ended = False
        self._pending: deque[ChatDelta] = deque()
        self._done = False
        self.prompt_tokens = prompt_estimate
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.estimated = True
        self._reading: asyncio.Task[None] | None = None
        self._calls: dict[int, dict[int, dict[str, str]]] = {}
        self._call_counts: dict[int, int] = {}

    def __aiter__(self) -> UpstreamStream:
        return self

    async def peek(self) -> None:
        """Read until the first delta is ready (used before any byte reaches the client)."""
        while not self._pending and not self._done:
            await self._next_event()
        if not self._pending:
            raise StreamError("the upstream ended its stream without any output")

    async def __anext__(self) -> ChatDelta:
        try:
            while not self._pending and not self._done:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamError("the upstream exceeded its total timeout")
                try:
                    async with asyncio.timeout(remaining):
                        await self._next_event()
                except TimeoutError:
                    raise StreamError("the upstream exceeded its total timeout") from None
                except httpx.HTTPError as exc:
                    raise StreamError(f"the upstream connection failed: "
                                      f"{type(exc).__name__}") from None
        except StreamError:
            await self._end(failed=True)
            raise
        if self._pending:
            return self._pending.popleft()
        await self._end(failed=False)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._end(failed=False)

    async def drain_usage(self, seconds: float) -> ChatDelta | None:
        """After the client went away: read on (at most `seconds`) until the upstream's
        usage arrives; the last counts known, estimated or not."""
        try:
            async with asyncio.timeout(seconds):
                while self.estimated and not self._done:
                    await self._next_event()
        except (TimeoutError, httpx.HTTPError, StreamError, RuntimeError):
            pass
        finally:
            await self._end(failed=False)
        return self._counts()

    async def _next_event(self) -> None:
        """Read one event in a task of its own, so that a cancelled request (its client
        went away) leaves the upstream connection readable for `drain_usage`."""
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(self._read_event())
        reading = self._reading
        try:
            await asyncio.shield(reading)
        finally:
            if reading.done():
                self._reading = None

    async def _end(self, *, failed: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if self._reading is not None:
            self._reading.cancel()
        await self._response.aclose()
        self._on_end(failed)

    async def _read_event(self) -> None:
        data: list[str] = []
        async for line in self._lines:
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif not line and data:
                break
        else:
            self._finish_stream()
            if not data:
                return
        payload = "\n".join(data)
        if payload == "[DONE]":
            self._finish_stream()
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise StreamError("the upstream sent malformed JSON") from None
        if not isinstance(chunk, dict):
            raise StreamError("the upstream sent an event that is not a JSON object")
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise StreamError(f"the upstream failed: {message}")
        self._read_chunk(chunk)

    def _finish_stream(self) -> None:
        if self._done:
            return
        self._done = True
        for index in list(self._calls):
            self._flush_calls(index, None)

    def _read_chunk(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            delta = choice.get("delta") or choice.get("message") or {}
            text = delta.get("content") or ""
            reasoning = reasoning_of(delta)
            finish = choice.get("finish_reason")
            if self.estimated:
                self.completion_tokens += estimate_tokens(text) + estimate_tokens(reasoning)
            for call in delta.get("tool_calls") or ():
                self._add_call(index, call)
            logprobs = None  # upstream logprobs are not passed on
            if text or reasoning:
                self._pending.append(self._delta(index, text=text, reasoning=reasoning,
                                                 logprobs=logprobs))
            if finish is not None:
                calls = self._flush_calls(index, None, emit=False)
                self._pending.append(self._delta(index, finish_reason=str(finish),
                                                 tool_calls=calls))
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.estimated = False
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            self.cached_tokens = int((usage.get("prompt_tokens_details") or {})
                                     .get("cached_tokens") or 0)
            self.reasoning_tokens = int((usage.get("completion_tokens_details") or {})
                                        .get("reasoning_tokens") or 0)
            self._pending.append(self._counts())

    def _add_call(self, choice: int, fragment: dict[str, Any]) -> None:
        calls = self._calls.setdefault(choice, {})
        position = int(fragment.get("index", 0))
        if position not in calls and calls:
            self._flush_calls(choice, position)
            calls = self._calls.setdefault(choice, {})
        call = calls.setdefault(position, {"id": "", "name": "", "arguments": ""})
        function = fragment.get("function") or {}
        call["id"] = call["id"] or str(fragment.get("id") or "")
        call["name"] = call["name"] or str(function.get("name") or "")
        call["arguments"] += str(function.get("arguments") or "")
        if self.estimated:
            self.completion_tokens += estimate_tokens(str(function.get("arguments") or ""))

    def _flush_calls(self, choice: int, keep: int | None,
                     emit: bool = True) -> tuple[ToolCallDelta, ...]:
        calls = self._calls.pop(choice, {})
        done: list[ToolCallDelta] = []
        for _, call in sorted(calls.items()):
            number = self._call_counts.get(choice, 0)
            self._call_counts[choice] = number + 1
            done.append(ToolCallDelta(number, call["id"] or f"call_{number}", call["name"],
                                      call["arguments"]))
        if emit and done:
            self._pending.append(self._delta(choice, tool_calls=tuple(done)))
        return tuple(done)

    def _delta(self, index: int, *, text: str = "", reasoning: str = "",
               finish_reason: str | None = None, tool_calls: tuple[ToolCallDelta, ...] = (),
               logprobs: None = None) -> ChatDelta:
        return ChatDelta(text, self.prompt_tokens, self.completion_tokens, finish_reason,
                         self.cached_tokens, index, logprobs, reasoning, tool_calls,
                         self.reasoning_tokens, usage_estimated=self.estimated)

    def _counts(self) -> ChatDelta:
        return self._delta(0)
