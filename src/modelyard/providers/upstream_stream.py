"""One upstream response read as `ChatDelta`s in SPEC.md's shape.

The upstream answers with server-sent events (`data: {chunk}` blocks, `data: [DONE]` at
the end). Each event becomes zero or more deltas: text, reasoning (under whichever name
the upstream uses), tool-call fragments as they arrive, logprobs, finish reasons, and the
upstream's usage. Token counts are bounded from above as text arrives (UTF-8 bytes: every
token of a byte-level BPE vocabulary is at least one byte; the deltas say so with
`usage_estimated`) until the upstream's own usage arrives; a stream that ends without
usage keeps that bound, so an upstream that reports nothing is never under-billed.

Nothing an upstream sends can raise anything but what the caller expects: an event that
is not OpenAI's shape (not JSON, wrong types, a choice index the request did not ask
for, a null logprob) is `Malformed`, an error event is `ReportedError`, and inside the
stream both, like connection failures and timeouts, end it with a `StreamError` whose
message names the request, never the upstream's words (those are logged). A single event
is capped (`MAX_EVENT_BYTES`); the total deadline holds inside every read
(`http1.Response`), so an upstream sending only SSE comments cannot hold a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from modelyard.errors import ModelyardError
from modelyard.providers.base import ChatDelta, StreamError, TokenLogprobs, ToolCallDelta
from modelyard.providers.http1 import DeadlineExceeded, HTTPError, Response
from modelyard.providers.profiles import reasoning_of
from modelyard.usage import Usage

logger = logging.getLogger(__name__)

MAX_EVENT_BYTES = 1024 * 1024
"""The default cap on one server-sent event."""

END_OF_BODY_TIMEOUT_S = 0.5
"""How long a finished stream waits for its body's last bytes before dropping the
connection (reading them returns the connection to the pool)."""

MAX_COUNT = 2**40
"""A token count or index at or above it is not one."""

_EVENT_END = b"\n\n"


def token_bound(text: str) -> int:
    """An upper bound on the tokens of `text` for byte-level BPE tokenizers: its UTF-8
    length."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class Malformed(ModelyardError):
    """An upstream answer or event that is not in OpenAI's shape."""


class ReportedError(ModelyardError):
    """An upstream's own error, sent as an event (or a whole answer) with `error`."""


class UpstreamStream:
    """The deltas of one upstream response; `on_end(failed)` is called once when it ends."""

    def __init__(self, response: Response, prompt_estimate: int,
                 on_end: Callable[[bool], None], *, request_id: str = "",
                 deployment: str = "", choices: int = 1,
                 max_event: int = MAX_EVENT_BYTES) -> None:
        self._response = response
        self._on_end = on_end
        self._request_id = request_id
        self._deployment = deployment
        self._choices = choices
        self._max_event = max_event
        self._buffer = bytearray()
        self._scanned = 0
        self._cr = False
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
        """Read until the first delta is ready (used before any byte reaches the client);
        raises what reading raised (HTTPError, TimeoutError, Malformed, ReportedError)."""
        while not self._pending and not self._done:
            await self._read_event()
        if not self._pending:
            raise Malformed("the stream ended without any output")

    def read_whole(self, raw: bytes) -> None:
        """Take a whole (non-streamed) answer: one `chat.completion` JSON body, already
        read to its end; Malformed or ReportedError when it cannot be used."""
        self._done = True
        self._take(raw)
        if not self._pending:
            raise Malformed("the answer has no output")

    async def __anext__(self) -> ChatDelta:
        if not self._pending and not self._done:
            try:
                while not self._pending and not self._done:
                    await self._read_event()
            except Exception as exc:  # whatever the upstream did: the stream's error event
                self._done = True
                self._pending.clear()
                await self._end(failed=True)
                raise self.failure(exc) from None
        if self._pending:
            return self._pending.popleft()
        await self._end(failed=False)
        raise StopAsyncIteration

    def failure(self, exc: BaseException) -> StreamError:
        """The client's side of a failure: a message naming the request; the detail goes
        to the log."""
        if isinstance(exc, DeadlineExceeded):
            detail, what = "past its total timeout", "timed out"
        elif isinstance(exc, TimeoutError):
            detail, what = "silent past its read timeout", "timed out"
        else:
            detail, what = f"{type(exc).__name__}: {exc}", "failed"
        known = (HTTPError, TimeoutError, Malformed, ReportedError, StreamError)
        logger.warning("request %s: upstream %s %s", self._request_id, self._deployment,
                       repr(detail[:500]), exc_info=not isinstance(exc, known))
        return StreamError(f"the upstream deployment {what} (request {self._request_id})")

    async def aclose(self) -> None:
        await self._end(failed=False)

    async def drain_usage(self, seconds: float) -> Usage | None:
        """After the client went away: read on (at most `seconds`) until the upstream's
        usage arrives; the last counts known, estimated or not."""
        try:
            async with asyncio.timeout(seconds):
                while self.estimated and not self._done:
                    await self._read_event()
        except Exception:  # whatever ended the reading, the counts so far are the answer
            pass
        finally:
            await self._end(failed=False)
        return self._usage()

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
        buffer = self._buffer
        while True:
            end = buffer.find(_EVENT_END, self._scanned)
            if end < 0:
                if len(buffer) > self._max_event:
                    raise Malformed(f"an event exceeds {self._max_event} bytes")
                self._scanned = max(0, len(buffer) - 1)
                chunk = await self._response.read_chunk()
                if not chunk:
                    event = bytes(buffer)
                    buffer.clear()
                    self._scanned = 0
                    self._event(event)
                    self._done = True
                    return
                self._append(chunk)
                continue
            if end > self._max_event:
                raise Malformed(f"an event exceeds {self._max_event} bytes")
            event = bytes(buffer[:end])
            del buffer[:end + 2]
            self._scanned = 0
            if self._event(event):
                return

    def _append(self, chunk: bytes) -> None:
        """Add read bytes to the buffer with every line end as "\\n" (SSE allows "\\r\\n"
        and "\\r" too), a "\\r\\n" split between two reads included."""
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._buffer += chunk

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
            raise Malformed("an event is not JSON") from None
        if not isinstance(chunk, dict):
            raise Malformed("an event is not a JSON object")
        error = chunk.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            raise ReportedError(str(message)[:500])
        self._read_chunk(chunk)

    def _read_chunk(self, chunk: dict[str, Any]) -> None:
        choices = chunk.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise Malformed("choices is not a list")
        for choice in choices or ():
            if not isinstance(choice, dict):
                raise Malformed("a choice is not an object")
            index = _count(choice.get("index"), "a choice's index")
            if index >= self._choices:
                raise Malformed(f"choice index {index} of a request for {self._choices}")
            delta = choice.get("delta")
            if delta is None:
                delta = choice.get("message")
            if delta is None and "text" in choice:  # a text completion's choice
                delta = {"content": choice["text"]}
            delta = _object(delta, "a choice's delta")
            text = _text(delta.get("content"), "content")
            reasoning = reasoning_of(delta)
            finish = _text(choice.get("finish_reason"), "finish_reason")[:64] or None
            raw_calls = delta.get("tool_calls")
            if raw_calls is not None and not isinstance(raw_calls, list):
                raise Malformed("tool_calls is not a list")
            calls = tuple(_tool_call(call) for call in raw_calls or ())
            logprobs = _logprobs(choice.get("logprobs"))
            if self.estimated:
                self.completion_tokens += (token_bound(text) + token_bound(reasoning)
                                           + sum(token_bound(c.arguments) for c in calls)
                                           + (finish is not None))
            if text or reasoning or calls or logprobs:
                self._pending.append(self._delta(index, text=text, reasoning=reasoning,
                                                 tool_calls=calls, logprobs=logprobs))
            if finish is not None:
                self._pending.append(self._delta(index, finish_reason=finish))
        usage = chunk.get("usage")
        if usage is None:
            return
        usage = _object(usage, "usage")
        if usage.get("completion_tokens") is None:
            return
        completion = _count(usage["completion_tokens"], "usage.completion_tokens")
        prompt = _count(usage.get("prompt_tokens"), "usage.prompt_tokens", self.prompt_tokens)
        cached = _count(_object(usage.get("prompt_tokens_details"), "usage details")
                        .get("cached_tokens"), "usage.cached_tokens")
        reasoning_tokens = _count(_object(usage.get("completion_tokens_details"),
                                          "usage details").get("reasoning_tokens"),
                                  "usage.reasoning_tokens")
        self.estimated = False
        self.prompt_tokens, self.completion_tokens = prompt, completion
        self.cached_tokens, self.reasoning_tokens = min(cached, prompt), reasoning_tokens
        self._pending.append(self._counts())

    def _delta(self, index: int, *, text: str = "", reasoning: str = "",
               finish_reason: str | None = None, tool_calls: tuple[ToolCallDelta, ...] = (),
               logprobs: tuple[TokenLogprobs, ...] | None = None) -> ChatDelta:
        return ChatDelta(text, self._usage(), finish_reason, index, logprobs, reasoning,
                         tool_calls)

    def _usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.cached_tokens, self.completion_tokens,
                     self.reasoning_tokens, self.estimated)

    def _counts(self) -> ChatDelta:
        return self._delta(0)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Malformed(f"{what} is not an object")
    return value


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Malformed(f"{what} is not a string")
    return value


def _count(value: Any, what: str, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        raise Malformed(f"{what} is not a count")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise Malformed(f"{what} is not a number")
    return float(value)


def _tool_call(fragment: Any) -> ToolCallDelta:
    """A streamed tool-call fragment as it came: the first of a call carries its id and
    name, the rest only more of its arguments."""
    fragment = _object(fragment, "a tool call")
    function = _object(fragment.get("function"), "a tool call's function")
    return ToolCallDelta(_count(fragment.get("index"), "a tool call's index"),
                         _text(fragment.get("id"), "a tool call's id"),
                         _text(function.get("name"), "a tool call's name"),
                         _text(function.get("arguments"), "a tool call's arguments"))


def _logprobs(raw: Any) -> tuple[TokenLogprobs, ...] | None:
    """OpenAI's `logprobs: {"content": [...]}` of one choice (or a text completion's
    legacy `{"tokens", "token_logprobs", "top_logprobs"}`), or None."""
    if isinstance(raw, dict) and "tokens" in raw:
        return _legacy_logprobs(raw)
    content = _object(raw, "logprobs").get("content")
    if content is None:
        return None
    if not isinstance(content, list):
        raise Malformed("logprobs.content is not a list")
    entries = []
    for entry in content:
        entry = _object(entry, "a logprobs entry")
        alternatives = entry.get("top_logprobs") or []
        if not isinstance(alternatives, list):
            raise Malformed("top_logprobs is not a list")
        top = []
        for alt in alternatives:
            alt = _object(alt, "a top_logprobs entry")
            top.append((_token(alt), _bytes(alt), _number(alt.get("logprob"), "a logprob")))
        entries.append(TokenLogprobs(_token(entry), _bytes(entry),
                                     _number(entry.get("logprob"), "a logprob"), tuple(top)))
    return tuple(entries) or None


def _legacy_logprobs(raw: dict[str, Any]) -> tuple[TokenLogprobs, ...] | None:
    tokens, values = raw.get("tokens"), raw.get("token_logprobs")
    tops = raw.get("top_logprobs") or [None] * len(tokens or ())
    if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)
            and len(tokens) == len(values) == len(tops)):
        raise Malformed("legacy logprobs are not lists of one length")
    entries = []
    for token, value, top in zip(tokens, values, tops, strict=True):
        if not isinstance(token, str):
            raise Malformed("a logprobs token is not a string")
        alternatives = tuple((_text(alt, "a top_logprobs token"), list(alt.encode("utf-8")),
                              _number(lp, "a logprob"))
                             for alt, lp in _object(top, "a top_logprobs entry").items())
        entries.append(TokenLogprobs(token, list(token.encode("utf-8")),
                                     _number(value, "a logprob"), alternatives))
    return tuple(entries) or None


def _token(entry: dict[str, Any]) -> str:
    token = entry.get("token")
    if not isinstance(token, str):
        raise Malformed("a logprobs token is not a string")
    return token


def _bytes(entry: dict[str, Any]) -> list[int]:
    raw = entry.get("bytes")
    if raw is None:
        return list(_token(entry).encode("utf-8"))
    if not isinstance(raw, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in raw):
        raise Malformed("a logprobs entry's bytes are not bytes")
    return raw
