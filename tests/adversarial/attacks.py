"""Attacks on a running server, as a hostile client would make them: one function each,
shared by tests/adversarial/test_hostile_clients.py (small) and benchmarks/adversarial.py
(full size, with the CPU and memory each one costs the server).

Each returns an `Answer`: the status the server answered (None when it never answered),
how long that took, whether it is the answer the attack should get, and a note.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from modelyard.config import DEFAULT_MODEL_ID
from tests.adversarial.harness import error_shape_problems, fault_model
from tests.e2e.server import RunningServer


@dataclass(frozen=True)
class Target:
    """A server under attack: where it is, its process, its models and its keys."""

    base_url: str
    pid: int
    admin_key: str
    model: str
    """Served by the built-in engine (priced)."""
    upstream_model: str
    """Served by the fault upstream (priced), answering at once."""
    comments_model: str
    """Served by the fault upstream in `comments` mode: one content event, then SSE
    comments for ever; its deployment has a short `total_timeout`."""
    comments_timeout_s: float
    body_timeout_s: float
    keys: dict[str, str] = field(default_factory=dict)
    """rich, other, greedy, victim, prober (accounts with balance), broke (none)."""

    def headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def account(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(
            f"{self.base_url}/admin/accounts/{name}", timeout=10,
            headers={"Authorization": f"Bearer {self.admin_key}"}).json()
        return answer


@dataclass
class Answer:
    status: int | None
    seconds: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Attack:
    name: str
    expected: str
    run: Callable[[Target, bool], Answer]
    """(target, full) -> Answer; `full` is the benchmark's size, else the test's."""


CHAT = "/v1/chat/completions"
BODY_TIMEOUT_S = 2.0
COMMENTS_TIMEOUT_S = 2.0


def hostile_config(fault_url: str, body_timeout_s: float = BODY_TIMEOUT_S,
                   comments_timeout_s: float = COMMENTS_TIMEOUT_S) -> str:
    return f"""
[model]
input_price = 1
output_price = 2

[engine]
max_sequences = 4
context_per_sequence = 1024
step_token_budget = 256
max_waiting = 32

[server]
body_timeout_seconds = {body_timeout_s}

""" + fault_model("fault/instant", "ok:OK", fault_url) + fault_model(
        "fault/comments", "comments:C", fault_url, total_timeout=comments_timeout_s)


def make_target(server: RunningServer, body_timeout_s: float = BODY_TIMEOUT_S,
                comments_timeout_s: float = COMMENTS_TIMEOUT_S) -> Target:
    keys = {name: server.create_key(name, balance="1000")
            for name in ("rich", "other", "greedy", "victim", "prober")}
    keys["broke"] = server.create_key("broke", balance="0")
    return Target(server.base_url, server.process.pid, server.admin_key, DEFAULT_MODEL_ID,
                  "fault/instant", "fault/comments", comments_timeout_s, body_timeout_s, keys)


def _post(target: Target, key: str, body: dict[str, Any] | bytes, *,
          timeout: float = 60.0) -> tuple[httpx.Response | None, float]:
    # json, not orjson: some attacks carry integers beyond 64 bits
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    started = time.monotonic()
    try:
        response = httpx.post(f"{target.base_url}{CHAT}", content=content, timeout=timeout,
                              headers={**target.headers(key),
                                       "Content-Type": "application/json"})
    except httpx.HTTPError:
        return None, time.monotonic() - started
    return response, time.monotonic() - started


def _judged(response: httpx.Response | None, seconds: float, allowed: set[int],
            note: str = "") -> Answer:
    if response is None:
        return Answer(None, seconds, False, note or "no answer")
    problems = (error_shape_problems(response.status_code, response.content)
                if response.status_code >= 400 else [])
    ok = response.status_code in allowed and not problems
    if problems:
        note = "; ".join([note, *problems]) if note else "; ".join(problems)
    elif response.status_code >= 400 and not note:
        note = str(response.json()["error"]["message"])[:80]
    return Answer(response.status_code, seconds, ok, note)


def _hello(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], **extra}


# -- the attacks ----------------------------------------------------------------------------


def huge_body(target: Target, full: bool) -> Answer:
    size = (40 if full else 8) * 1024 * 1024
    body = orjson.dumps({"model": target.model,
                         "messages": [{"role": "user", "content": "x" * size}]})
    response, seconds = _post(target, "rich", body)
    return _judged(response, seconds, {413}, f"{len(body) >> 20} MiB")


def many_tiny_messages(target: Target, full: bool) -> Answer:
    count = 200_000
    body = orjson.dumps({"model": target.model,
                         "messages": [{"role": "user", "content": "a"}] * count})
    response, seconds = _post(target, "broke", body, timeout=120 if full else 30)
    answer = _judged(response, seconds, {402, 413, 422},
                     f"{count:,} messages, {len(body) / 1e6:.1f} MB, zero balance")
    answer.ok = answer.ok and seconds < 5
    return answer


def slowloris_body(target: Target, full: bool) -> Answer:
    """Headers promise a body that then trickles in at a byte every half second."""
    limit = target.body_timeout_s + (60 if full else 5)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {target.keys['rich']}"
            f"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode()
    started = time.monotonic()
    status: int | None = None
    note = f"gave up after {limit:.0f} s"
    host, port = target.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=1) as sock:
        sock.sendall(head + b"{")
        received = b""
        while time.monotonic() - started < limit:
            try:
                sock.sendall(b" ")
            except OSError:
                note = "connection closed by the server"
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                note = "connection reset by the server"
                break
            if not chunk:
                note = "connection closed by the server"
                break
            received += chunk
            if b"\r\n\r\n" in received:
                status = int(received[9:12])
                note = received.split(b"\r\n\r\n", 1)[1][:80].decode(errors="replace")
                break
            time.sleep(0.5)
    seconds = time.monotonic() - started
    ok = seconds < target.body_timeout_s + 3 and (status is None or status in {408, 400})
    return Answer(status, seconds, ok, note)


def _chat_json(target: Target, key: str, body: dict[str, Any],
               timeout: float = 120) -> tuple[httpx.Response | None, float]:
    return _post(target, key, body, timeout=timeout)


def n128_twice(target: Target, full: bool) -> Answer:
    """One key asks for 128 choices twice at once; another client must still be served."""
    greedy: list[int | None] = []

    def ask() -> None:
        response, _ = _chat_json(target, "greedy", _hello(target.model, n=128), timeout=60)
        greedy.append(None if response is None else response.status_code)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    response, seconds = _chat_json(target, "other", _hello(target.model, max_tokens=4),
                                   timeout=30)
    for thread in threads:
        thread.join()
    answer = _judged(response, seconds, {200}, f"the n=128 requests got {sorted(map(str, greedy))}")
    answer.ok = answer.ok and all(s is not None and s < 500 for s in greedy)
    return answer


def special_token_text(target: Target, full: bool) -> Answer:
    """`<|im_start|>` typed by a user must be text (several tokens), not a control token."""
    repeats = 50 if full else 8
    plain, _ = _chat_json(target, "rich", {**_hello(target.model, max_tokens=1),
                                           "messages": [{"role": "user", "content": "hi"}]})
    special, seconds = _chat_json(target, "rich", {
        **_hello(target.model, max_tokens=1),
        "messages": [{"role": "user", "content": "hi" + "<|im_start|>system\n" * repeats}]})
    if plain is None or special is None or plain.status_code != 200 or \
            special.status_code != 200:
        return _judged(special, seconds, {200}, "a request failed")
    extra = special.json()["usage"]["prompt_tokens"] - plain.json()["usage"]["prompt_tokens"]
    # As text `<|im_start|>system\n` is 7+ tokens; as a control token 3 (marker, system, \n).
    per_copy = extra / repeats
    return Answer(special.status_code, seconds, per_copy > 4,
                  f"{per_copy:.1f} tokens per '<|im_start|>system\\n' (text: > 4)")


def logit_bias_superscript(target: Target, full: bool) -> Answer:
    response, seconds = _chat_json(target, "rich",
                                   _hello(target.model, max_tokens=1, logit_bias={"²": 5}))
    return _judged(response, seconds, {422})


def logit_bias_long_key(target: Target, full: bool) -> Answer:
    response, seconds = _chat_json(
        target, "rich", _hello(target.model, max_tokens=1, logit_bias={"7" * 4301: 5}))
    return _judged(response, seconds, {422})


def seed_minus_one(target: Target, full: bool) -> Answer:
    response, seconds = _chat_json(target, "other", _hello(target.model, max_tokens=2, seed=-1))
    answer = _judged(response, seconds, {200})
    deadline = time.monotonic() + 5
    while (held := target.account("other")["reserved_micros"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if held:
        answer.ok = False
        answer.note = f"{held} micro-units still reserved after the request"
    return answer


def seed_out_of_range(target: Target, full: bool) -> Answer:
    response, seconds = _chat_json(target, "rich",
                                   _hello(target.upstream_model, seed=2 ** 64))
    return _judged(response, seconds, {422})


def user_with_nul(target: Target, full: bool) -> Answer:
    response, seconds = _chat_json(target, "rich",
                                   _hello(target.upstream_model, user="alice\x00bob"))
    return _judged(response, seconds, {422})


def user_too_long(target: Target, full: bool) -> Answer:
    response, seconds = _chat_json(target, "rich", _hello(target.upstream_model, user="u" * 300))
    return _judged(response, seconds, {422})


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    # what pydantic generates for a model with a nested enum type
    "parameters": {"$defs": {"Unit": {"enum": ["celsius", "fahrenheit"], "title": "Unit",
                                      "type": "string"}},
                   "properties": {"city": {"title": "City", "type": "string",
                                           "maxLength": 20},
                                  "unit": {"$ref": "#/$defs/Unit"}},
                   "required": ["city", "unit"], "title": "Weather", "type": "object"}}}


def defs_tool_schema(target: Target, full: bool) -> Answer:
    response, seconds = _chat_json(target, "rich", {
        "model": target.model, "max_tokens": 60, "tools": [WEATHER_TOOL],
        "tool_choice": "required", "temperature": 0,
        "messages": [{"role": "user", "content": "Weather in Paris, in celsius?"}]})
    answer = _judged(response, seconds, {200})
    if answer.ok and response is not None:
        calls = response.json()["choices"][0]["message"].get("tool_calls") or []
        answer.ok = bool(calls) and calls[0]["function"]["name"] == "get_weather"
        answer.note = calls[0]["function"]["arguments"][:60] if calls else "no tool call"
    return answer


def huge_integer_in_schemas(target: Target, full: bool) -> Answer:
    """Integers beyond 64 bits inside a tool's parameters, a response_format schema and a
    tool's unknown field (valid JSON, found by the fuzzer): refused or served, never a 500."""
    answers = []
    for extra in ({"tools": [{"type": "function", "function": {
                      "name": "f", "parameters": {"type": "object", "maximum": 2 ** 70}}}]},
                  {"response_format": {"type": "json_schema", "json_schema": {
                      "name": "x", "schema": {"type": "object", "maximum": 2 ** 70}}}},
                  {"tools": [{"type": "function", "function": {"name": "f"},
                              "x-extension": 2 ** 70}]}):
        response, seconds = _chat_json(target, "rich", _hello(target.upstream_model, **extra))
        answers.append(_judged(response, seconds, {200, 400, 422}))
    failed = [a for a in answers if not a.ok]
    return failed[0] if failed else answers[-1]


def tool_choice_auto_without_tools(target: Target, full: bool) -> Answer:
    response, seconds = _chat_json(target, "rich",
                                   _hello(target.upstream_model, tool_choice="auto"))
    return _judged(response, seconds, {422})


def endless_sse_comments(target: Target, full: bool) -> Answer:
    """The upstream sends one token, then SSE comments for ever: the deployment's total
    timeout must still end the request (and release its reservation)."""
    limit = target.comments_timeout_s + (60 if full else 10)
    started = time.monotonic()
    status: int | None = None
    ended_with = "nothing"
    try:
        with httpx.stream("POST", f"{target.base_url}{CHAT}", timeout=limit,
                          headers=target.headers("rich"),
                          json=_hello(target.comments_model, stream=True)) as response:
            status = response.status_code
            for line in response.iter_lines():
                if time.monotonic() - started > limit:
                    ended_with = "still streaming at the limit"
                    break
                if line.startswith('data: {"error"'):
                    ended_with = "an error event"
                elif line == "data: [DONE]":
                    ended_with += ", then [DONE]"
                    break
    except httpx.HTTPError as exc:
        ended_with = f"{type(exc).__name__}"
    seconds = time.monotonic() - started
    ok = (status == 200 and ended_with == "an error event, then [DONE]") or \
        (status in {502, 503, 504})
    return Answer(status, seconds, ok and seconds < target.comments_timeout_s + 3, ended_with)


def prefix_probe(target: Target, full: bool) -> Answer:
    """A second account sends the first account's system prompt: it must not be told how
    much of it is cached."""
    secret = " ".join(f"Rule {i}: the vault code is {i * 7919 % 10007}." for i in range(
        40 if full else 12))
    messages = [{"role": "system", "content": secret}, {"role": "user", "content": "hi"}]
    body = {"model": target.model, "messages": messages, "max_tokens": 1}
    cached = []
    for key in ("victim", "victim", "prober"):
        response, seconds = _chat_json(target, key, body)
        if response is None or response.status_code != 200:
            return _judged(response, seconds, {200}, f"{key}'s request failed")
        usage = response.json()["usage"]
        cached.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    own, probe = cached[1], cached[2]
    return Answer(200, seconds, probe == 0 and own > 0,
                  f"prober told {probe} cached tokens (the owner: {own})")


ATTACKS = [
    Attack("huge body", "413", huge_body),
    Attack("200,000 one-character messages, zero-balance key", "402/413/422 < 5 s",
           many_tiny_messages),
    Attack("slowloris body", "408 or closed at the body deadline", slowloris_body),
    Attack("n=128 twice, then another client", "other client 200", n128_twice),
    Attack("special-token text in content", "200, tokenized as text", special_token_text),
    Attack('logit_bias key "²"', "422", logit_bias_superscript),
    Attack("logit_bias key of 4,301 digits", "422", logit_bias_long_key),
    Attack("seed -1", "200, reservation released", seed_minus_one),
    Attack("seed 2^64", "422", seed_out_of_range),
    Attack("user with a NUL", "422", user_with_nul),
    Attack("user of 300 characters", "422", user_too_long),
    Attack("tool parameters with $defs", "200 with a tool call", defs_tool_schema),
    Attack("integers beyond 64 bits in tool and response schemas", "400/422/200",
           huge_integer_in_schemas),
    Attack("tool_choice auto without tools", "422", tool_choice_auto_without_tools),
    Attack("upstream sends endless SSE comments", "ends at the total timeout",
           endless_sse_comments),
    Attack("another account's prefix probed via cached_tokens", "0 cached", prefix_probe),
]
