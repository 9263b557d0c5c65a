"""Platform benchmark: what keys, limits, balances and the ledger add to every request.

The same app (`modelyard.api.app.create_app`, uvicorn, one process) runs three times in
front of an instant in-process model, one server after another:

- `open`: `OpenGate`, no accounts: the baseline;
- `sqlite`: `AccountsGate` on SQLite (WAL, in a temporary directory), limits in process;
- `postgres+redis`: `AccountsGate` on PostgreSQL with rate limits in Redis.

The key has RPM and TPM limits (high enough never to refuse) and the model has prices, so
every request goes through the whole platform path: key lookup, both rate limits, the
balance reservation, then settlement and the usage record. For each server: requests/s at
full load (closed loop), then client-side latency at a fixed arrival rate (open loop,
default 200 requests/s), whose p50/p99 minus the baseline's is the added latency. The
server also times the gate's own calls (`authenticate` + `admit` on the request path,
`settle` after it) and reports them.

    .venv/bin/python benchmarks/bench_platform.py            # about 2 minutes
    .venv/bin/python benchmarks/bench_platform.py --quick    # a smoke run

PostgreSQL and Redis default to the local standard ports (`--postgres-url`,
`--redis-url`); the run creates and drops its own database and deletes its Redis keys.
Run it on an otherwise idle machine: the header prints the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as host
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis
from _common import Pool, machine, open_loop, save_results
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url

from modelyard.api.app import create_app
from modelyard.api.state import AppState
from modelyard.config import Config, ModelConfig, PlatformConfig
from modelyard.platform import accounts as ops
from modelyard.platform import service
from modelyard.platform.gate import Admission, Caller, Gate, OpenGate, Outcome, Ticket
from modelyard.platform.money import Price
from modelyard.providers.base import (
    ChatDelta,
    ChatRequest,
    ChatStream,
    DeltaStream,
    PreparedChat,
    Provider,
)
from modelyard.usage import Usage

MODEL = "bench-model"
COMPLETION_TOKENS = 16
PROMPT = [{"role": "user", "content": "How fast is the platform path of a request?"}]


class InstantProvider(Provider[None]):
    """A stand-in for a model that answers at once, so that what is measured is the
    platform path around it, not inference."""

    model_id = MODEL

    def describe(self) -> dict[str, Any]:
        return {"context_length": 4096}

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat[None]:
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in request.messages)
        return PreparedChat(request, prompt_tokens, request.max_tokens or COMPLETION_TOKENS,
                            None, self)

    async def start_chat(self, prepared: PreparedChat[None]) -> ChatStream:
        return DeltaStream(self._answer(prepared))

    async def _answer(self, prepared: PreparedChat[None]) -> AsyncGenerator[ChatDelta, None]:
        yield ChatDelta("word " * prepared.max_tokens,
                        Usage(prepared.prompt_tokens, completion_tokens=prepared.max_tokens),
                        "length")


class TimingGate(Gate):
    """Delegates to the real gate and records how long each of its calls takes."""

    def __init__(self, inner: Gate) -> None:
        self.inner = inner
        self.on_path: list[float] = []
        self.settling: list[float] = []
        self._auth: dict[int, float] = {}

    async def authenticate(self, authorization: str | None) -> Caller:
        started = time.perf_counter()
        caller = await self.inner.authenticate(authorization)
        self._auth[id(caller)] = time.perf_counter() - started
        return caller

    def may_use(self, caller: Caller, model: str) -> bool:
        return self.inner.may_use(caller, model)

    async def check_in(self, caller: Caller) -> Ticket:
        started = time.perf_counter()
        ticket = await self.inner.check_in(caller)
        self._auth[id(caller)] = self._auth.get(id(caller), 0.0) + time.perf_counter() - started
        return ticket

    async def check_out(self, ticket: Ticket) -> None:
        await self.inner.check_out(ticket)

    def price(self, model: str) -> Price:
        return self.inner.price(model)

    async def admit(self, ticket: Ticket, model: str, prompt_tokens: int,
                    max_tokens: int) -> Admission:
        started = time.perf_counter()
        admission = await self.inner.admit(ticket, model, prompt_tokens, max_tokens)
        self.on_path.append(self._auth.pop(id(ticket.caller), 0.0)
                            + time.perf_counter() - started)
        return admission

    async def settle(self, admission: Admission, outcome: Outcome) -> None:
        started = time.perf_counter()
        await self.inner.settle(admission, outcome)
        self.settling.append(time.perf_counter() - started)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()


# -- the server side (a child process) -------------------------------------------------------


def platform_config(database_url: str, redis_url: str | None, prefix: str) -> Config:
    return Config(database_url=database_url, redis_url=redis_url,
                  model=ModelConfig(id=MODEL, input_price=0.5, output_price=1.5),
                  platform=PlatformConfig(redis_prefix=prefix))


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    gate: Gate = OpenGate()
    if args.database_url:
        config = platform_config(args.database_url, args.redis_url, args.redis_prefix)
        gate = service.accounts_gate(config)
    timing = TimingGate(gate)
    state = AppState(providers={MODEL: InstantProvider()}, registry=CollectorRegistry(),
                     gate=timing)
    inner = create_app(state)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        """The app, plus POST /bench/reset: forget the timings so far (only the
        fixed-rate phase is reported)."""
        if scope["type"] == "http" and scope["path"] == "/bench/reset":
            timing.on_path.clear()
            timing.settling.clear()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", b"15")]})
            await send({"type": "http.response.body", "body": b'{"reset": true}'})
            return
        await inner(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    Path(args.stats).write_text(json.dumps({"on_path": timing.on_path,
                                            "settle": timing.settling}))


# -- the client side -------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    max_rps: float
    rate: float
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    gate_p50_ms: float | None = None
    gate_p99_ms: float | None = None
    settle_p50_ms: float | None = None
    settle_p99_ms: float | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def request_bytes(key: str) -> bytes:
    body = json.dumps({"model": MODEL, "messages": PROMPT,
                       "max_tokens": COMPLETION_TOKENS}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body)


async def closed_loop(pool: Pool, payload: bytes, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            if await pool.request(payload) is not None:
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return done / (time.perf_counter() - started)


async def measure(name: str, port: int, key: str, args: argparse.Namespace) -> Result:
    payload = request_bytes(key)
    pool = Pool(port)
    try:
        await closed_loop(pool, payload, 8, args.warmup)
        max_rps = await closed_loop(pool, payload, args.concurrency, args.max_seconds)
        await asyncio.sleep(2)  # settlements of the full-load phase finish
        reset = payload.replace(b"POST /v1/chat/completions", b"POST /bench/reset", 1)
        await pool.request(reset)
        latencies, errors, achieved = await open_loop(pool, payload, args.rate, args.seconds)
    finally:
        pool.close()
    return Result(name, max_rps, args.rate, achieved, percentile(latencies, 50),
                  percentile(latencies, 99), errors)


def wait_healthy(base_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the benchmark server exited early")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the benchmark server did not start")


def run_server(name: str, key: str, args: argparse.Namespace, workdir: Path,
               database_url: str | None = None, redis_url: str | None = None,
               prefix: str = "modelyard") -> Result:
    port = free_port()
    stats = workdir / f"{name}.stats.json"
    command = [sys.executable, __file__, "--serve", "--port", str(port), "--stats", str(stats),
               "--redis-prefix", prefix]
    if database_url:
        command += ["--database-url", database_url]
    if redis_url:
        command += ["--redis-url", redis_url]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process)
        print(f"  {name}: load average {os.getloadavg()[0]:.2f}", flush=True)
        result = asyncio.run(measure(name, port, key, args))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    timings = json.loads(stats.read_text())
    if name != "open":
        result.gate_p50_ms = percentile(timings["on_path"], 50)
        result.gate_p99_ms = percentile(timings["on_path"], 99)
        result.settle_p50_ms = percentile(timings["settle"], 50)
        result.settle_p99_ms = percentile(timings["settle"], 99)
    return result


async def provision(database_url: str, redis_url: str | None, prefix: str) -> str:
    """Migrate, create a well-funded account and a key with (generous) RPM/TPM limits."""
    config = platform_config(database_url, redis_url, prefix)
    await service.prepare(config)
    db = service.open_database(config)
    try:
        await ops.create_account(db, "bench", 10**15)
        created = await ops.create_key(db, "bench", rpm=10**8, tpm=10**9)
    finally:
        await db.close()
    return created.text


async def pg_admin(url: str, statement: str) -> None:
    parsed = make_url(url)
    connection = await asyncpg.connect(host=parsed.host, port=parsed.port or 5432,
                                       user=parsed.username, password=parsed.password,
                                       database=parsed.database, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def with_postgres(args: argparse.Namespace, body: Callable[[str], Result]) -> Result | None:
    """Run `body` on a database of its own, dropped afterwards."""
    name = f"modelyard_bench_{secrets.token_hex(4)}"
    try:
        asyncio.run(pg_admin(args.postgres_url, f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"  postgres+redis: skipped, PostgreSQL unavailable: {exc}")
        return None
    try:
        url = make_url(args.postgres_url).set(database=name).render_as_string(
            hide_password=False)
        return body(url)
    finally:
        asyncio.run(pg_admin(args.postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def machine_line() -> str:
    info = machine()
    return (f"{info['cpu']}, {info['cores']} cores, Python {host.python_version()}")


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[Result]) -> str:
    base = results[0]
    lines = ["| gate | max req/s | p50 / p99 ms at "
             f"{base.rate:.0f} req/s | added p50 / p99 ms | gate on the path p50 / p99 ms | "
             "settle p50 / p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        added = "-" if r is base else (f"{r.p50_ms - base.p50_ms:+.2f} / "
                                       f"{r.p99_ms - base.p99_ms:+.2f}")
        lines.append(f"| {r.name} | {r.max_rps:.0f} | {fmt(r.p50_ms)} / {fmt(r.p99_ms)} | "
                     f"{added} | {fmt(r.gate_p50_ms)} / {fmt(r.gate_p99_ms)} | "
                     f"{fmt(r.settle_p50_ms)} / {fmt(r.settle_p99_ms)} | {r.errors} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="open-loop duration")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--max-seconds", type=float, default=6.0, help="closed-loop duration")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--backends", default="sqlite,postgres",
                        help="what to measure after the open baseline (sqlite, postgres)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--redis-prefix", default="modelyard", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.quick:
        args.seconds, args.max_seconds, args.warmup = 3.0, 2.0, 0.5
    print(f"# platform benchmark: {machine_line()}; load average {os.getloadavg()[0]:.2f}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="modelyard-bench-") as tmp:
        workdir = Path(tmp)
        results.append(run_server("open", "any-key", args, workdir))
        sqlite_url = f"sqlite:///{workdir / 'platform.db'}"
        key = asyncio.run(provision(sqlite_url, None, "unused"))
        if "sqlite" in args.backends:
            results.append(run_server("sqlite", key, args, workdir, sqlite_url))
        if "postgres" in args.backends:
            prefix = f"modelyard-bench-{secrets.token_hex(4)}"

            def on_postgres(url: str) -> Result:
                pg_key = asyncio.run(provision(url, args.redis_url, prefix))
                return run_server("postgres+redis", pg_key, args, workdir, url,
                                  args.redis_url, prefix)

            try:
                measured = with_postgres(args, on_postgres)
            finally:
                client = redis.Redis.from_url(args.redis_url)
                stale = list(client.scan_iter(match=f"{prefix}:*"))
                if stale:
                    client.delete(*stale)
                client.close()
            if measured is not None:
                results.append(measured)
    print()
    print(table(results))
    save_results("platform", {"machine": machine_line(), "rate": args.rate,
                              "results": [asdict(r) for r in results]})


if __name__ == "__main__":
    main()
