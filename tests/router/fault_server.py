"""A tiny OpenAI-compatible upstream for tests and benchmarks, with faults on request.

A raw asyncio HTTP/1.1 server (keep-alive, chunked streaming), run as its own process:
`python -m tests.router.fault_server PORT`. The upstream model name picks the behaviour,
`MODE[:TAG]`, where TAG is the answer's text (so a test can tell deployments apart); a
request without `stream` gets one JSON answer with the same faults where they apply:

  ok            answer at once (stream or not), with usage
  nousage       stream without a usage chunk
  slow=S        wait S seconds before the response head
  status=N      answer status N with an error body
  reset         two content events, then drop the connection
  malformed     a data event that is not JSON
  reasoning     a `reasoning` delta (vLLM's name), then the answer
  drip=N        N content events 20 ms apart, then usage
  tools         a tool call in three fragments (id and name, then two argument pieces)
  logprobs      the answer with OpenAI logprobs (two alternatives)
  toggle        like ok, but 500 while the tag is switched off (POST /control/TAG/off|on)
  comments      (stream only) one content event, then an SSE comment every 10 ms for ever
  continue      a "100 Continue" and a "103 Early Hints" head before the answer
  hangup        read the request, then close the connection without answering
  huge=N        a content event (or a whole answer's content) of N bytes, after one of TAG
  nulllogprob   a logprobs entry with "logprob": null (streamed after one content event)
  badtypes      content that is a number (streamed after one content event)
  leak=N        status N with an error naming an internal URL, address and key

GET /requests returns every chat request body received (JSON list); DELETE clears it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson

RECEIVED: list[dict[str, Any]] = []
FAILING: set[str] = set()


def _head(status: int, content_type: str, length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-type: {content_type}"]
    lines.append(f"content-length: {length}" if length is not None
                 else "transfer-encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return _chunk(f"data: {text}\n\n".encode())


async def _json(writer: asyncio.StreamWriter, status: int, body: Any) -> None:
    data = orjson.dumps(body)
    writer.write(_head(status, "application/json", len(data)) + data)
    await writer.drain()


def _base(model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}


def _choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": finish}


LEAK = ("deployment http://10.9.8.7:8000/v1 (gpu-7.internal:8000) refused the key "
        "sk-live-0123456789abcdef:\n\tmax_tokens is too large")

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 3}}


async def _chat(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    model = str(body.get("model", "ok"))
    mode, _, tag = model.partition(":")
    name, _, arg = mode.partition("=")
    tag = tag or "hello"
    if name == "slow":
        await asyncio.sleep(float(arg))
    if name == "status":
        await _json(writer, int(arg), {"error": {"message": f"injected {arg}"}})
        return
    if name == "leak":
        await _json(writer, int(arg), {"error": {"message": LEAK, "param": "max_tokens",
                                                 "type": "invalid_request_error"}})
        return
    if name == "hangup":
        writer.close()  # the request was read: no answer
        return
    if name == "continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                     b"HTTP/1.1 103 Early Hints\r\nlink: </hint>; rel=preload\r\n\r\n")
    if name == "toggle" and tag in FAILING:
        await _json(writer, 500, {"error": {"message": "switched off"}})
        return
    if not body.get("stream"):
        await _whole(writer, model, name, arg, tag)
        return
    base = _base(model)
    out = [_head(200, "text/event-stream", None),
           _event({**base, "choices": [_choice({"role": "assistant", "content": ""})]})]
    if name == "malformed":
        writer.write(b"".join(out) + _chunk(b"data: {not json\n\n"))
        await writer.drain()
        writer.close()
        return
    if name == "reasoning":
        out.append(_event({**base, "choices": [_choice({"reasoning": "thinking it over"})]}))
    if name in BAD_EVENTS:
        out.append(_event({**base, "choices": [_choice({"content": tag})]}))
        out.append(_event({**base, "choices": [BAD_EVENTS[name](arg)]}))
    if name == "comments":
        out.append(_event({**base, "choices": [_choice({"content": tag})]}))
        writer.write(b"".join(out))
        while not writer.is_closing():  # until the client goes away
            writer.write(_chunk(b": keep-alive\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)
        return
    if name == "reset":
        out += [_event({**base, "choices": [_choice({"content": part})]}) for part in ("a", "b")]
        writer.write(b"".join(out))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
        return
    if name == "tools":
        out += [_event({**base, "choices": [_choice({"tool_calls": [fragment]})]})
                for fragment in TOOL_FRAGMENTS]
        out.append(_event({**base, "choices": [_choice({}, "tool_calls")]}))
        out += [_event({**base, "choices": [], "usage": USAGE}), _event("[DONE]"), b"0\r\n\r\n"]
        writer.write(b"".join(out))
        await writer.drain()
        return
    if name == "logprobs":
        out.append(_event({**base, "choices": [{**_choice({"content": tag}),
                                                 "logprobs": _logprobs(tag)}]}))
        out += [_event({**base, "choices": [_choice({}, "stop")]}),
                _event({**base, "choices": [], "usage": USAGE}), _event("[DONE]"), b"0\r\n\r\n"]
        writer.write(b"".join(out))
        await writer.drain()
        return
    if name == "drip":
        writer.write(b"".join(out))
        out = []
        for _ in range(int(arg)):
            writer.write(_event({**base, "choices": [_choice({"content": tag})]}))
            await writer.drain()
            await asyncio.sleep(0.02)
    else:
        out.append(_event({**base, "choices": [_choice({"content": tag})]}))
    out.append(_event({**base, "choices": [_choice({}, "stop")]}))
    if name != "nousage":
        out.append(_event({**base, "choices": [], "usage": USAGE}))
    out.append(_event("[DONE]"))
    out.append(b"0\r\n\r\n")
    writer.write(b"".join(out))
    await writer.drain()


BAD_EVENTS = {
    "huge": lambda arg: _choice({"content": "x" * int(arg)}),
    "nulllogprob": lambda arg: {**_choice({"content": "x"}), "logprobs": {"content": [
        {"token": "x", "logprob": None, "bytes": [120], "top_logprobs": []}]}},
    "badtypes": lambda arg: _choice({"content": 42}),
}

TOOL_FRAGMENTS = [
    {"index": 0, "id": "call_up1", "type": "function",
     "function": {"name": "get_weather", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"city": '}},
    {"index": 0, "function": {"arguments": '"Paris"}'}},
]


def _logprobs(tag: str) -> dict[str, Any]:
    raw = list(tag.encode())
    return {"content": [{"token": tag, "logprob": -0.25, "bytes": raw,
                         "top_logprobs": [{"token": tag, "logprob": -0.25, "bytes": raw},
                                          {"token": "x", "logprob": -2.5, "bytes": [120]}]}]}


async def _whole(writer: asyncio.StreamWriter, model: str, name: str, arg: str,
                 tag: str) -> None:
    """A non-streamed answer, with the same faults as the streamed one where they apply."""
    message: dict[str, Any] = {"role": "assistant", "content": tag}
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "message": message}
    if name == "malformed":
        writer.write(_head(200, "application/json", 9) + b"{not json")
        await writer.drain()
        return
    if name == "reset":
        writer.write(_head(200, "application/json", 500) + b'{"id": "chatcmpl-up", ')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
        return
    if name == "drip":
        await asyncio.sleep(0.02 * int(arg))
        message["content"] = tag * int(arg)
    if name == "huge":
        message["content"] = tag + "x" * int(arg)
    if name == "nulllogprob":
        choice["logprobs"] = {"content": [{"token": tag, "logprob": None, "top_logprobs": []}]}
    if name == "badtypes":
        message["content"] = 42
    if name == "reasoning":
        message["reasoning"] = "thinking it over"
    if name == "tools":
        message.update(content=None, tool_calls=[{
            "id": "call_up1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}])
        choice["finish_reason"] = "tool_calls"
    if name == "logprobs":
        choice["logprobs"] = _logprobs(tag)
    answer: dict[str, Any] = {"id": "chatcmpl-up", "object": "chat.completion",
                              "created": int(time.time()), "model": model,
                              "choices": [choice]}
    if name != "nousage":
        answer["usage"] = USAGE
    await _json(writer, 200, answer)


async def _text_completion(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    """POST /completions: the model's tag as the text, whole or streamed (no faults)."""
    model = str(body.get("model", "ok"))
    tag = model.partition(":")[2] or "hello"
    base = {"id": "cmpl-up", "object": "text_completion", "created": int(time.time()),
            "model": model}
    if not body.get("stream"):
        await _json(writer, 200, {**base, "usage": USAGE, "choices": [
            {"index": 0, "text": tag, "logprobs": None, "finish_reason": "stop"}]})
        return
    events = [{**base, "choices": [{"index": 0, "text": tag, "logprobs": None,
                                    "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": "stop"}]},
              {**base, "choices": [], "usage": USAGE}]
    writer.write(_head(200, "text/event-stream", None)
                 + b"".join(_event(event) for event in events) + _event("[DONE]")
                 + _chunk(b""))
    await writer.drain()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "POST" and path.endswith("/chat/completions"):
                body = orjson.loads(raw)
                RECEIVED.append(body)
                await _chat(writer, body)
            elif method == "POST" and path.endswith("/completions"):
                body = orjson.loads(raw)
                RECEIVED.append(body)
                await _text_completion(writer, body)
            elif path == "/requests" and method == "GET":
                await _json(writer, 200, RECEIVED)
            elif path == "/requests" and method == "DELETE":
                RECEIVED.clear()
                await _json(writer, 200, {})
            elif path.startswith("/control/"):
                _, _, tag, state = path.split("/")
                (FAILING.add if state == "off" else FAILING.discard)(tag)
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
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
