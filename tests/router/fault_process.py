"""Start `tests/router/fault_server.py` as a process of its own, for as long as needed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.e2e.server import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def running_fault_server() -> Iterator[str]:
    """The server's base URL (http://127.0.0.1:PORT) while it runs."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.router.fault_server", str(port)],
                               cwd=ROOT, stdin=subprocess.DEVNULL)
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
