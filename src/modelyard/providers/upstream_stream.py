"""One upstream response read as `ChatDelta`s in SPEC.md's shape.

The upstream answers with server-sent events (`data: {chunk}` blocks, `data: [DONE]` at
the end). Each event becomes zero or more deltas: text, reasoning (under whichever name
the upstream uses), tool-call fragments as they arrive, logprobs, finish reasons, and the
upstream's usage. Token counts are estimated as text arrives (the deltas say so with
`usage_estimated`) until the upstream's own usage arrives; a stream that ends without
usage keeps the estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from modelyard.providers.base import ChatDelta, StreamError, TokenLogprobs, ToolCallDelta
from modelyard.providers.http1 import HTTPError, Response
from modelyard.providers.profiles import reasoning_of

CHARS_PER_TOKEN = 4
"""The estimate used when an upstream reports no usage: one token per 4 characters."""

END_OF_BODY_TIMEOUT_S = 0.5
"""How long a finished stream waits for its body's last bytes before dropping the
connection (reading them returns the connection to the pool)."""

_EVENT_END = b"\n\n"


def estimate_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


class UpstreamStream:
    """The deltas of one upstream response; `on_end(failed)` is called once when it ends."""

    def __init__(self, response: Response, prompt_estimate: int,
                 deadline: float, on_end: Callable[[bool], None]) -> None:
        self._response = response
        self._deadline = deadline
        self._on_end = on_end
        self._buffer = b""
        self._ended = False
        self._pending: deque[ChatDelta] = deque()
        self._done = False
        self.prompt_tokens = prompt_estimate
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.estimated = True

    def __aiter__(self) -> UpstreamStream:
        return self

    async def peek(self) -> None:
        """Read until the first delta is ready (used before any byte reaches the client)."""
        while not self._pending and not self._done:
            await self._read_event()
        if not self._pending:
            raise StreamError("the upstream ended its stream without any output")

    def read_whole(self, raw: bytes) -> None:
        """Take a whole (non-streamed) answer: one `chat.completion` JSON body, already
        read to its end."""
        self._done = True
        self._take(raw)
        if not self._pending:
            raise StreamError("the upstream answered without any output")

    async def __anext__(self) -> ChatDelta:
        try:
            while not self._pending and not self._done:
                # The silence between two reads is bounded by the response's read timeout;
                # the total time is checked between events.
                if time.monotonic() > self._deadline:
                    raise StreamError("the upstream exceeded its total timeout")
                try:
                    await self._read_event()
                except TimeoutError:
                    raise StreamError("the upstream went silent (read timeout)") from None
                except HTTPError as exc:
                    raise StreamError(f"the upstream connection failed: {exc}") from None
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
                    await self._read_event()
        except (TimeoutError, HTTPError, StreamError, RuntimeError):
            pass
        finally:
            await self._end(failed=False)
        return self._counts()

    async def _end(self, *, failed: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if self._done and not failed:
            # After [DONE] only the end of the body is left: read it, so the connection
            # goes back to the pool instead of being closed.
            with contextlib.suppress(HTTPError, TimeoutError):
                async with asyncio.timeout(END_OF_BODY_TIMEOUT_S):
                    while await self._response.read_chunk():
                        pass
        self._response.release()  # back to the pool only if its body was read to the end
        self._on_end(failed)

    async def _read_event(self) -> None:
        """Read up to the end of the next event that carries data, and turn it into
        deltas; at the end of the body, finish the stream.

        Cancelling it (the client went away) loses nothing: bytes join the buffer only
        once a read has returned them, so `drain_usage` can read on from where it was."""
        while True:
            end = self._buffer.find(_EVENT_END)
            if end < 0:
                chunk = await self._response.read_chunk()
                if not chunk:
                    event, self._buffer = self._buffer, b""
                    self._event(event)
                    self._done = True
                    return
                self._buffer += chunk
                if b"\r" in self._buffer:
                    self._buffer = self._buffer.replace(b"\r\n", b"\n")
                continue
            event = self._buffer[:end]
            self._buffer = self._buffer[end + 2:]
            if self._event(event):
                return

    def _event(self, event: bytes) -> bool:
        """Handle one event's text; whether it carried data."""
        data = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if not data:
            return False
        payload = b"\n".join(data)
        if payload == b"[DONE]":
            self._done = True
            return True
        self._take(payload)
        return True

    def _take(self, payload: bytes) -> None:
        """One JSON chunk (or a whole answer) into deltas."""
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

    def _read_chunk(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            delta = choice.get("delta") or choice.get("message") or {}
            text = delta.get("content") or ""
            reasoning = reasoning_of(delta)
            finish = choice.get("finish_reason")
            calls = tuple(self._tool_call(call) for call in delta.get("tool_calls") or ())
            logprobs = _logprobs(choice.get("logprobs"))
            if self.estimated:
                self.completion_tokens += (estimate_tokens(text) + estimate_tokens(reasoning)
                                           + sum(estimate_tokens(c.arguments) for c in calls))
            if text or reasoning or calls or logprobs:
                self._pending.append(self._delta(index, text=text, reasoning=reasoning,
                                                 tool_calls=calls, logprobs=logprobs))
            if finish is not None:
                self._pending.append(self._delta(index, finish_reason=str(finish)))
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

    @staticmethod
    def _tool_call(fragment: dict[str, Any]) -> ToolCallDelta:
        """A streamed tool-call fragment as it came: the first of a call carries its id and
        name, the rest only more of its arguments."""
        function = fragment.get("function") or {}
        return ToolCallDelta(int(fragment.get("index", 0)), str(fragment.get("id") or ""),
                             str(function.get("name") or ""),
                             str(function.get("arguments") or ""))

    def _delta(self, index: int, *, text: str = "", reasoning: str = "",
               finish_reason: str | None = None, tool_calls: tuple[ToolCallDelta, ...] = (),
               logprobs: tuple[TokenLogprobs, ...] | None = None) -> ChatDelta:
        return ChatDelta(text, self.prompt_tokens, self.completion_tokens, finish_reason,
                         self.cached_tokens, index, logprobs, reasoning, tool_calls,
                         self.reasoning_tokens, usage_estimated=self.estimated)

    def _counts(self) -> ChatDelta:
        return self._delta(0)


def _logprobs(raw: Any) -> tuple[TokenLogprobs, ...] | None:
    """OpenAI's `logprobs: {"content": [...]}` of one chunk, or None."""
    if not isinstance(raw, dict) or not isinstance(raw.get("content"), list):
        return None
    entries = []
    for entry in raw["content"]:
        if not isinstance(entry, dict) or "token" not in entry:
            continue
        token = str(entry["token"])
        top = tuple((str(alt.get("token", "")), _bytes(alt), float(alt.get("logprob", 0.0)))
                    for alt in entry.get("top_logprobs") or () if isinstance(alt, dict))
        entries.append(TokenLogprobs(token, _bytes(entry), float(entry.get("logprob", 0.0)),
                                     top))
    return tuple(entries) or None


def _bytes(entry: dict[str, Any]) -> list[int]:
    raw = entry.get("bytes")
    if isinstance(raw, list):
        return [int(b) for b in raw]
    return list(str(entry.get("token", "")).encode("utf-8"))
