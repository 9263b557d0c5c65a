"""Fake Anthropic and Gemini upstreams for tests, built from their published API
references: Anthropic's Messages API (`POST /v1/messages`, named SSE events) and Google's
Gemini API (`POST /v1beta/models/{model}:generateContent`, and
`:streamGenerateContent?alt=sse` with one `data:` line per response chunk).

A raw asyncio HTTP/1.1 server (keep-alive), run as its own process:
`python -m tests.router.native_fake_server PORT`. The model name picks the behaviour,
`MODE[:TAG]` (TAG: the answer's text), whole or streamed as asked:

  ok            the answer, usage with cached tokens
  thinking      a thinking block (Anthropic, with its signature) or thought part
                (Gemini) before the answer
  tools         text, then a tool call (Anthropic: input_json_delta fragments; Gemini: a
                functionCall part)
  noargs        (Anthropic) a tool call whose input stays empty
  max           stopped at max_tokens (MAX_TOKENS)
  multi         (Gemini) two candidates
  safety        (Gemini) finishReason SAFETY, no content
  blocked       (Gemini) the prompt blocked (promptFeedback.blockReason)
  status=N      status N with the API's error body (429 and 529 with retry-after: 7)
  leak=N        status N with an error naming an internal URL, address and key
  streamerror   (stream) one text delta, then the API's error event

GET /requests returns every request received ({path, headers, body}); DELETE clears.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any
from urllib.parse import unquote

import orjson

RECEIVED: list[dict[str, Any]] = []
HEADERS = ("x-api-key", "anthropic-version", "x-goog-api-key", "authorization",
           "content-type")

LEAK = ("deployment http://10.9.8.7:8000/v1 (gpu-7.internal:8000) refused the key "
        "sk-ant-0123456789abcdef:\n\tmax_tokens: too large")

ANTHROPIC_USAGE = {"input_tokens": 11, "cache_creation_input_tokens": 2,
                   "cache_read_input_tokens": 3, "output_tokens": 7}
GEMINI_USAGE = {"promptTokenCount": 11, "candidatesTokenCount": 5, "cachedContentTokenCount": 3,
                "totalTokenCount": 16}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}
GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def _head(status: int, content_type: str, length: int | None,
          extra: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    lines.append(f"content-length: {length}" if length is not None
                 else "transfer-encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _json(writer: asyncio.StreamWriter, status: int, body: Any,
                extra: dict[str, str] | None = None) -> None:
    data = orjson.dumps(body)
    writer.write(_head(status, "application/json", len(data), extra) + data)
    await writer.drain()


async def _stream(writer: asyncio.StreamWriter, events: list[bytes]) -> None:
    writer.write(_head(200, "text/event-stream", None)
                 + b"".join(_chunk(event) for event in events) + _chunk(b""))
    await writer.drain()


def _mode(model: str) -> tuple[str, str, str]:
    mode, _, tag = model.partition(":")
    name, _, arg = mode.partition("=")
    return name, arg, tag or "hello"


async def _error(writer: asyncio.StreamWriter, status: int, message: str, google: bool) -> None:
    extra = {"retry-after": "7"} if status in (429, 529) else None
    if google:
        body: dict[str, Any] = {"error": {"code": status, "message": message,
                                          "status": GOOGLE_STATUS.get(status, "UNKNOWN")}}
    else:
        body = {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                           "message": message}}
    await _json(writer, status, body, extra)


# -- Anthropic ------------------------------------------------------------------------

def _event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n"


def _anthropic_blocks(name: str, tag: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if name == "thinking":
        blocks.append({"type": "thinking", "thinking": "Let me think.", "signature": "c2ln"})
    if name in ("tools", "noargs"):
        blocks.append({"type": "text", "text": "Checking."})
        blocks.append({"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                       "input": {"city": "Paris"} if name == "tools" else {}})
    else:
        blocks.append({"type": "text", "text": tag})
    return blocks


def _stop_reason(name: str) -> str:
    return {"tools": "tool_use", "noargs": "tool_use", "max": "max_tokens"}.get(name, "end_turn")


async def _anthropic(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    model = str(body.get("model", "ok"))
    name, arg, tag = _mode(model)
    if name == "status":
        await _error(writer, int(arg), f"injected {arg}", google=False)
        return
    if name == "leak":
        await _error(writer, int(arg), LEAK, google=False)
        return
    blocks = _anthropic_blocks(name, tag)
    message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
               "content": blocks, "stop_reason": _stop_reason(name), "stop_sequence": None,
               "usage": ANTHROPIC_USAGE}
    if not body.get("stream"):
        await _json(writer, 200, message)
        return
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**ANTHROPIC_USAGE, "output_tokens": 1}}
    events = [_event("message_start", {"type": "message_start", "message": start}),
              _event("ping", {"type": "ping"})]
    for index, block in enumerate(blocks):
        events += _anthropic_block_events(index, block)
        if name == "streamerror":
            events.append(_event("error", {"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}}))
            await _stream(writer, events)
            return
    events.append(_event("message_delta", {
        "type": "message_delta", "delta": {"stop_reason": _stop_reason(name),
                                           "stop_sequence": None},
        "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]}}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    await _stream(writer, events)


def _anthropic_block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    kind = block["type"]
    def delta(payload: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": payload})
    if kind == "text":
        start = {"type": "text", "text": ""}
        text = block["text"]
        deltas = [delta({"type": "text_delta", "text": text[:2]}),
                  delta({"type": "text_delta", "text": text[2:]})]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [delta({"type": "thinking_delta", "thinking": block["thinking"]}),
                  delta({"type": "signature_delta", "signature": block["signature"]})]
    else:
        start = {**block, "input": {}}
        raw = orjson.dumps(block["input"]).decode() if block["input"] else ""
        pieces = ["", raw[:9], raw[9:]] if raw else [""]
        deltas = [delta({"type": "input_json_delta", "partial_json": piece})
                  for piece in pieces]
    return [_event("content_block_start", {"type": "content_block_start", "index": index,
                                           "content_block": start}),
            *deltas,
            _event("content_block_stop", {"type": "content_block_stop", "index": index})]


# -- Gemini ---------------------------------------------------------------------------

def _candidate(parts: list[dict[str, Any]], index: int = 0,
               finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": index}
    if finish:
        candidate["finishReason"] = finish
    return candidate


def _gemini_chunks(name: str, tag: str, model: str) -> list[dict[str, Any]]:
    """The streamed chunks (a whole answer is their merge)."""
    base = {"modelVersion": model, "responseId": "resp-fake"}
    partial = {"promptTokenCount": 11, "totalTokenCount": 11}
    usage = dict(GEMINI_USAGE)
    if name == "blocked":
        return [{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": partial, **base}]
    if name == "safety":
        return [{"candidates": [{"finishReason": "SAFETY", "index": 0}],
                 "usageMetadata": {**usage, "candidatesTokenCount": 0}, **base}]
    chunks: list[dict[str, Any]] = []
    if name == "thinking":
        usage["thoughtsTokenCount"] = 2
        chunks.append({"candidates": [_candidate([{"text": "Thinking it over.",
                                                   "thought": True}])],
                       "usageMetadata": partial, **base})
    if name == "tools":
        chunks.append({"candidates": [_candidate([{"text": "Checking."}])],
                       "usageMetadata": partial, **base})
        last = [_candidate([{"functionCall": {"name": "get_weather",
                                              "args": {"city": "Paris"}}}], finish="STOP")]
    elif name == "multi":
        last = [_candidate([{"text": tag}], 0, "STOP"), _candidate([{"text": tag * 2}], 1,
                                                                   "STOP")]
    else:
        chunks.append({"candidates": [_candidate([{"text": tag[:2]}])],
                       "usageMetadata": partial, **base})
        last = [_candidate([{"text": tag[2:]}], finish="MAX_TOKENS" if name == "max" else "STOP")]
    chunks.append({"candidates": last, "usageMetadata": usage, **base})
    return chunks


def _merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {**chunks[-1]}
    candidates: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for candidate in chunk.get("candidates", []):
            into = candidates.setdefault(candidate["index"], {"content": {"parts": [],
                                                                          "role": "model"}})
            into["content"]["parts"] += candidate.get("content", {}).get("parts", [])
            into.update({k: v for k, v in candidate.items() if k != "content"})
    if candidates:
        merged["candidates"] = [candidates[i] for i in sorted(candidates)]
    return merged


async def _gemini(writer: asyncio.StreamWriter, path: str, body: dict[str, Any]) -> None:
    model, _, method = unquote(path.rsplit("/models/", 1)[1]).rpartition(":")
    name, arg, tag = _mode(model)
    if name == "status":
        await _error(writer, int(arg), f"injected {arg}", google=True)
        return
    if name == "leak":
        await _error(writer, int(arg), LEAK, google=True)
        return
    chunks = _gemini_chunks(name, tag, model)
    if not method.startswith("streamGenerateContent"):
        await _json(writer, 200, _merge(chunks))
        return
    events = [b"data: " + orjson.dumps(chunk) + b"\r\n\r\n" for chunk in chunks]
    if name == "streamerror":
        error = {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}
        events = [events[0], b"data: " + orjson.dumps({"error": error}) + b"\r\n\r\n"]
    await _stream(writer, events)


# -- the server -----------------------------------------------------------------------

async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "POST" and ("/messages" in path or "/models/" in path):
                body = orjson.loads(raw)
                RECEIVED.append({"path": path, "body": body, "headers": {
                    name: headers[name] for name in HEADERS if name in headers}})
                if "/models/" in path:
                    await _gemini(writer, path, body)
                else:
                    await _anthropic(writer, body)
            elif path == "/requests" and method == "GET":
                await _json(writer, 200, RECEIVED)
            elif path == "/requests" and method == "DELETE":
                RECEIVED.clear()
                await _json(writer, 200, {})
            else:
                await _json(writer, 404, {"error": {"message": "not found"}})
            if writer.is_closing():
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        if not writer.is_closing():
            writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=256)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
