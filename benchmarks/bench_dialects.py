"""Dialect benchmark: what answering in Anthropic's Messages (and OpenAI's Responses) API
costs next to Chat Completions, on the same server, in the same run.

An instant upstream (tests/router/fault_server.py, answering at once) runs on loopback; in
front of it `modelyard serve` routes a catalog model to it (platform on: key lookup,
reservation, settlement and a usage record per request, SQLite), exactly as the gateway
benchmark does. Each endpoint is sent the same small request (one user message, 16 tokens
at most) at a fixed arrival rate (open loop), streamed and not; the rounds interleave the
endpoints so that drift on a shared machine touches them alike, and the median over the
rounds is shown. The client's p50 latency of the whole answer and the server process's
CPU time per request are read as in benchmarks/bench_gateway.py; the difference to chat's
is the translation's own cost (target: within 0.3 ms).

    .venv/bin/python benchmarks/bench_dialects.py [--rate 100] [--seconds 5] [--rounds 3]

/v1/responses is measured when the server answers it (with `store: false`, so that no
stored response is counted). A second table times the translations alone, in this process
(parsing the body, building the ChatRequest, writing the answer from three deltas), which
a busy machine cannot blur.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import Pool, exit_on_sigterm, open_loop, stop_processes  # noqa: E402
from bench_gateway import Target, _pct, _wait  # noqa: E402

from tests.e2e.server import free_port, modelyard_command  # noqa: E402

MODEL = "bench/instant"
MESSAGE = [{"role": "user", "content": "hi"}]
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGE, "max_tokens": 16},
    "/v1/messages": {"model": MODEL, "messages": MESSAGE, "max_tokens": 16},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 16, "store": False},
}
HEADERS = {"/v1/messages": ["anthropic-version: 2023-06-01"]}


class Endpoint(Target):
    """One path of the server, with its own body and headers."""

    def payload(self, stream: bool) -> bytes:
        body = orjson.dumps({**BODIES[self.path], "stream": stream})
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", f"Content-Length: {len(body)}",
                f"Authorization: Bearer {self.key}", *HEADERS.get(self.path, [])]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _measure(target: Target, rate: float, seconds: float,
                   stream: bool) -> tuple[float, float, int]:
    """p50 latency (ms), CPU ms per request, failed requests."""
    pool = Pool(target.port, target.host)
    payload = target.payload(stream)
    try:
        for _ in range(20):  # warm the connections
            await pool.request(payload)
        cpu = target.cpu_seconds()
        latencies, failed, _ = await open_loop(pool, payload, rate, seconds)
        cpu_ms = (target.cpu_seconds() - cpu) / int(rate * seconds) * 1000
    finally:
        pool.close()
    return _pct(sorted(latencies), 0.5), cpu_ms, failed


def _start(work: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    (work / "modelyard.toml").write_text(
        f'database_url = "sqlite:///{work / "platform.db"}"\nlog_level = "warning"\n'
        f'[[models]]\nid = "{MODEL}"\ninput_price = 1\noutput_price = 2\n'
        f'[[models.deployments]]\nbase_url = "{upstream}/v1"\n'
        f'upstream_model = "ok:hello"\nprofile = "passthrough"\nmax_concurrency = 4096\n')
    log = work / "modelyard.log"
    process = subprocess.Popen(
        [*modelyard_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--config", str(work / "modelyard.toml")],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        env=dict(os.environ, MODELYARD_DATA_DIR=str(work / "data")))
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", process)
    admin = log.read_text().split("admin key: ")[1].split()[0]
    auth = {"Authorization": f"Bearer {admin}"}
    httpx.post(f"{url}/admin/accounts", json={"name": "bench", "balance": "100000"},
               headers=auth, timeout=10).raise_for_status()
    key = httpx.post(f"{url}/admin/keys", json={"account": "bench"}, headers=auth,
                     timeout=10).json()["key"]
    return process, url, str(key)


def _answers(url: str, key: str, path: str) -> bool:
    response = httpx.post(f"{url}{path}", json=BODIES[path], timeout=10,
                          headers={"Authorization": f"Bearer {key}"})
    return response.status_code == 200


def _per_call_us(work: Callable[[], object], seconds: float = 0.5) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            work()
        count += 100
    return (time.perf_counter() - started) / count * 1e6


def translation_costs() -> dict[str, tuple[float, float]]:
    """Microseconds per request of each dialect's own work (non-stream, stream)."""
    from modelyard.api.anthropic.answer import Collected, EventWriter, Head
    from modelyard.api.anthropic.schema import MessagesRequest
    from modelyard.api.anthropic.translate import to_chat_request
    from modelyard.api.chat import _to_chat_request
    from modelyard.api.responses import ChoiceResult, Completion
    from modelyard.api.schema import ChatCompletionRequest
    from modelyard.providers.base import ChatDelta
    from modelyard.usage import Usage

    usage = Usage(10, 0, 3)
    deltas = [ChatDelta("Hel", usage), ChatDelta("lo", usage),
              ChatDelta("!", usage, finish_reason="stop")]
    chat_body = orjson.dumps(BODIES["/v1/chat/completions"])
    messages_body = orjson.dumps(BODIES["/v1/messages"])

    def chat(stream: bool) -> None:
        payload = ChatCompletionRequest.model_validate_json(chat_body)
        _to_chat_request(payload, "chatcmpl-1", "acct")
        completion = Completion("chatcmpl-1", 0, MODEL, "fp")
        if stream:
            completion.chunk({"role": "assistant", "content": ""})
            for delta in deltas:
                completion.chunk({"content": delta.text}, delta.finish_reason)
            return
        choice = ChoiceResult(0)
        for delta in deltas:
            choice.parts.append(delta.text)
            choice.finish_reason = delta.finish_reason or choice.finish_reason
        orjson.dumps(completion.body([choice], usage.as_openai()))

    def messages(stream: bool) -> None:
        payload = MessagesRequest.model_validate_json(messages_body)
        to_chat_request(payload, "msg_1", "acct", False)
        head = Head("msg_1", MODEL)
        if stream:
            writer = EventWriter(head)
            writer.start(10)
            for delta in deltas:
                writer.delta(delta)
            writer.finish(usage)
            return
        collected = Collected(head)
        for delta in deltas:
            collected.add(delta)
        orjson.dumps(collected.body(usage))

    return {name: (_per_call_us(partial(work, False)), _per_call_us(partial(work, True)))
            for name, work in (("/v1/chat/completions", chat), ("/v1/messages", messages))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    exit_on_sigterm()   # killed, it still stops its servers (the `finally` below)
    work = Path(tempfile.mkdtemp(prefix="bench-dialects-"))
    processes: list[subprocess.Popen[bytes]] = []
    log = open(work / "log.txt", "wb")  # noqa: SIM115
    try:
        up_port = free_port()
        processes.append(subprocess.Popen([sys.executable, "-m", "tests.router.fault_server",
                                           str(up_port)], cwd=ROOT, stdout=log, stderr=log))
        upstream = f"http://127.0.0.1:{up_port}"
        _wait(f"{upstream}/requests", processes[-1])
        process, url, key = _start(work, upstream)
        processes.append(process)
        endpoints = {path: Endpoint(f"{url}{path}", key, process.pid) for path in BODIES
                     if _answers(url, key, path)}
        results: dict[tuple[str, bool], list[tuple[float, float, int]]] = {}
        for _ in range(args.rounds):
            for stream in (False, True):
                for path, endpoint in endpoints.items():
                    results.setdefault((path, stream), []).append(asyncio.run(
                        _measure(endpoint, args.rate, args.seconds, stream)))
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"{args.rate:.0f} requests/s for {args.seconds:.0f} s per point, median of "
              f"{args.rounds} interleaved rounds; instant upstream, platform on (SQLite)")
        print("| endpoint | mode | p50 latency ms | vs chat | CPU ms/request | vs chat | "
              "failed |")
        print("|---|---|---|---|---|---|---|")
        for stream in (False, True):
            chat = results[("/v1/chat/completions", stream)]
            chat_p50 = statistics.median(r[0] for r in chat)
            chat_cpu = statistics.median(r[1] for r in chat)
            for path in endpoints:
                rows = results[(path, stream)]
                p50 = statistics.median(r[0] for r in rows)
                cpu = statistics.median(r[1] for r in rows)
                failed = sum(r[2] for r in rows)
                mode = "stream" if stream else "non-stream"
                print(f"| {path} | {mode} | {p50:.2f} | {p50 - chat_p50:+.2f} | {cpu:.2f} | "
                      f"{cpu - chat_cpu:+.2f} | {failed} |", flush=True)
        costs = translation_costs()
        print("\nIn process, microseconds per request (parse, ChatRequest, answer from 3 "
              "deltas):")
        print("| endpoint | non-stream us | vs chat | stream us | vs chat |")
        print("|---|---|---|---|---|")
        chat_costs = costs["/v1/chat/completions"]
        for path, (whole, streamed) in costs.items():
            print(f"| {path} | {whole:.1f} | {whole - chat_costs[0]:+.1f} | {streamed:.1f} | "
                  f"{streamed - chat_costs[1]:+.1f} |")
    finally:
        stop_processes(processes)


if __name__ == "__main__":
    main()
