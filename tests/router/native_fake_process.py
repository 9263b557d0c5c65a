"""Start `tests/router/native_fake_server.py` as a process of its own, for as long as
needed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tests.e2e.server import free_port
from tests.router.fault_process import ROOT


@contextmanager
def running_native_fake() -> Iterator[str]:
    """The fake's base URL (http://127.0.0.1:PORT) while it runs."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.router.native_fake_server", str(port)], cwd=ROOT,
        stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/requests", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def received(url: str) -> list[dict[str, Any]]:
    """Every request the fake received since it was last cleared: {path, headers, body}."""
    requests: list[dict[str, Any]] = httpx.get(f"{url}/requests", timeout=5).json()
    return requests


def clear(url: str) -> None:
    httpx.delete(f"{url}/requests", timeout=5)
