"""Upstream client benchmark: the CPU one streamed upstream request costs the gateway,
through modelyard's own HTTP/1.1 client (`providers/http1.py`) and through the two
well-kept asyncio client libraries, side by side in one run.

The instant upstream (tests/router/fault_server.py, a process of its own, so its CPU is
not counted) answers each request with a short SSE stream (six events, usage included).
Each client sends the same POST and reads the whole streamed body as it arrives, on
kept-alive connections, `--concurrency` requests at a time; rounds of the clients
alternate (A B C A B C ...) so that drift in the machine's speed falls on all of them.
The measure is this process's CPU time (user + system) per request, median over rounds,
on uvloop when it is installed (the gateway runs on it). The last column is what each
would add to the gateway's whole CPU per request (`--gateway-cpu-ms`, the README's
gateway benchmark) compared with http1.py.

aiohttp is not one of modelyard's dependencies: run it in an environment of its own,

    python -m venv /tmp/client-bench
    /tmp/client-bench/bin/pip install aiohttp httpx httptools orjson uvloop
    PYTHONPATH=src /tmp/client-bench/bin/python benchmarks/bench_upstream_client.py

(a client that is not installed is skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "src"))

from _common import exit_on_sigterm, machine, save_results, stop_process  # noqa: E402

from modelyard.providers.http1 import Pool  # noqa: E402

BODY = orjson.dumps({"model": "ok", "stream": True, "stream_options": {"include_usage": True},
                     "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream",
           "Authorization": "Bearer sk-bench"}

Send = Callable[[], Awaitable[int]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http1_client(base: str, concurrency: int) -> tuple[Send, Callable[[], Any]]:
    pool = Pool(f"{base}/v1", connect_timeout=5, max_idle=concurrency, headers=HEADERS)

    async def send() -> int:
        response = await pool.post("chat/completions", BODY, read_timeout=10,
                                   deadline=time.monotonic() + 30)
        size = 0
        while chunk := await response.read_chunk():
            size += len(chunk)
        response.release()
        return size

    async def close() -> None:
        pool.close()
    return send, close


async def aiohttp_client(base: str, concurrency: int) -> tuple[Send, Callable[[], Any]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                    timeout=aiohttp.ClientTimeout(total=30, sock_read=10))
    url = f"{base}/v1/chat/completions"

    async def send() -> int:
        size = 0
        async with session.post(url, data=BODY, headers=HEADERS) as response:
            async for chunk in response.content.iter_any():
                size += len(chunk)
        return size
    return send, session.close


async def httpx_client(base: str, concurrency: int) -> tuple[Send, Callable[[], Any]]:
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency,
                                                   max_keepalive_connections=concurrency),
                               timeout=httpx.Timeout(30, read=10))
    url = f"{base}/v1/chat/completions"

    async def send() -> int:
        size = 0
        async with client.stream("POST", url, content=BODY, headers=HEADERS) as response:
            async for chunk in response.aiter_raw():
                size += len(chunk)
        return size
    return send, client.aclose


CLIENTS = {"http1.py": (http1_client, "httptools"), "aiohttp": (aiohttp_client, "aiohttp"),
           "httpx": (httpx_client, "httpx")}


async def one_round(send: Send, requests: int, concurrency: int) -> float:
    """CPU seconds per request over `requests` requests, `concurrency` at a time."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            assert await send() > 0
    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) / requests


async def measure(base: str, args: argparse.Namespace) -> dict[str, list[float]]:
    senders: dict[str, Send] = {}
    closers = []
    for name, (make, package) in CLIENTS.items():
        try:
            send, close = await make(base, args.concurrency)
        except ImportError:
            print(f"{name}: {package} is not installed, skipped", flush=True)
            continue
        senders[name] = send
        closers.append(close)
        await one_round(send, args.warmup, args.concurrency)
    rounds: dict[str, list[float]] = {name: [] for name in senders}
    for _ in range(args.rounds):
        for name, send in senders.items():
            rounds[name].append(await one_round(send, args.requests, args.concurrency))
    for close in closers:
        await close()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--gateway-cpu-ms", type=float, default=2.2,
                        help="the gateway's CPU per request, for the last column")
    args = parser.parse_args()
    exit_on_sigterm()   # so the upstream is still stopped (the `finally` below)
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "tests.router.fault_server", str(port)],
                                cwd=ROOT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        time.sleep(1.0)
        with contextlib.suppress(ImportError):
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        rounds = asyncio.run(measure(base, args))
    finally:
        stop_process(upstream)
    info = machine("httptools", "aiohttp", "httpx", "uvloop")
    print(f"\n{info['cpu']}, {info['cores']} cores, load {info['load_average_at_start']:.2f};"
          f" {args.rounds} rounds of {args.requests} streamed requests, concurrency "
          f"{args.concurrency}\n")
    print("| client | version | CPU ms/request (median) | min-max | x http1.py "
          f"| added to the gateway's {args.gateway_cpu_ms} ms |")
    print("|---|---|---:|---:|---:|---:|")
    base_cpu = statistics.median(rounds["http1.py"]) * 1000
    results = {}
    for name, values in rounds.items():
        cpu = statistics.median(values) * 1000
        package = CLIENTS[name][1]
        added = (cpu - base_cpu) / args.gateway_cpu_ms * 100
        print(f"| {name} | {package} {info[package]} | {cpu:.3f} | {min(values) * 1000:.3f}-"
              f"{max(values) * 1000:.3f} | {cpu / base_cpu:.1f} | {added:+.0f}% |")
        results[name] = {"cpu_ms_per_request": cpu, "rounds_ms": [v * 1000 for v in values]}
    save_results("upstream-client", {"machine": info, "results": results}, args)


if __name__ == "__main__":
    main()
