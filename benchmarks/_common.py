"""What the benchmark scripts share: the machine they ran on, where results go, and a
lean HTTP load generator.

The scripts run as `python benchmarks/NAME.py`, so this module is imported by its plain
name (`from _common import ...`); it needs nothing beyond the standard library, so a
benchmark may run in an environment of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(*packages: str) -> dict[str, Any]:
    """The CPU, core count, load average now, and the versions of `packages`."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0],
            **{package.replace("-", "_"): version(package) for package in packages}}


def save_results(kind: str, payload: dict[str, Any],
                 args: argparse.Namespace | None = None) -> Path:
    """Write `payload` (and the run's settings) to results/KIND-TIMESTAMP.json; its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if args is not None:
        payload = {"settings": {k: str(v) if isinstance(v, Path) else v
                                for k, v in vars(args).items()}, **payload}
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"\nJSON: {out}", flush=True)
    return out



def resolve_default_model(args: argparse.Namespace) -> None:
    """Fill `args.data_dir` (MODELYARD_DATA_DIR honoured) and, when not given,
    `args.model_path`: the packaged default model, assembled there. The only place this
    module imports modelyard (ImportError where it is not installed)."""
    from modelyard.config import DEFAULT_MODEL_SOURCE, load_config
    from modelyard.models import resolve_model_source

    args.data_dir = args.data_dir or load_config().data_dir
    if args.model_path is None:
        args.model_path = resolve_model_source(DEFAULT_MODEL_SOURCE, args.data_dir / "models")


RESULT_TABLE_HEAD = ["| benchmark | measurement | value | target | result |",
                     "|---|---|---:|---|---|"]
"""The head of the targets table the engine benchmarks print; `result_row` its rows."""


def result_row(bench: str, measurement: str, value: str, target: str = "",
               ok: bool | None = None) -> str:
    result = "" if ok is None else "PASS" if ok else "MISS"
    return f"| {bench} | {measurement} | {value} | {target} | {result} |"

# -- load generation ----------------------------------------------------------------------


class Pool:
    """Keep-alive HTTP/1.1 connections to one server, speaking just enough HTTP to send a
    ready-made request and read its whole answer (by length or chunked): the load
    generator shares the machine with the server, so it spends as little CPU as it can.
    A new connection is opened whenever none is idle."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def request(self, payload: bytes) -> float | None:
        """Seconds until the whole answer arrived, or None when it was not a 200 or the
        connection failed."""
        try:
            if self.idle:
                reader, writer = self.idle.pop()
                started = time.perf_counter()
                try:
                    status = await _exchange(reader, writer, payload)
                except (asyncio.IncompleteReadError, ConnectionError):
                    # The server closed a keep-alive connection that sat idle: a fresh one.
                    writer.close()
                    reader, writer = await self._open()
                    started = time.perf_counter()
                    status = await _exchange(reader, writer, payload)
            else:
                started = time.perf_counter()
                reader, writer = await self._open()
                status = await _exchange(reader, writer, payload)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return None
        elapsed = time.perf_counter() - started
        self.idle.append((reader, writer))
        return elapsed if status == 200 else None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened.append(writer)
        return reader, writer

    def close(self) -> None:
        for writer in self.opened:
            writer.close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    payload: bytes) -> int:
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    if not chunked:
        await reader.readexactly(length)
        return status
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return status


async def open_loop(pool: Pool, payload: bytes, rate: float,
                    seconds: float) -> tuple[list[float], int, float]:
    """Send at a fixed rate whatever the answers do: the latencies of the answers that
    succeeded, how many did not, and the rate achieved."""
    count = int(rate * seconds)
    tasks: list[asyncio.Task[float | None]] = []
    started = time.perf_counter()
    for i in range(count):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(pool.request(payload)))
    outcomes = await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    latencies = [o for o in outcomes if o is not None]
    return latencies, count - len(latencies), count / wall


# -- the servers a benchmark starts -------------------------------------------------------


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143), as Ctrl-C raises KeyboardInterrupt, so a benchmark
    stopped from outside still runs its `finally` blocks and `with` exits: those stop the
    servers it started, which would otherwise keep running. Call it first in `main`."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def stop_processes(processes: Iterable[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """Stop the servers a benchmark started: each still running is sent SIGTERM first, so
    they all stop at once; one still running `timeout` seconds later is killed."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server the benchmark started: terminate, then kill after 30 s."""
    stop_processes([proc])
