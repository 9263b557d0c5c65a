"""What the adversarial tests and `benchmarks/adversarial.py` share: SPEC.md's error shape,
what a server process spends (CPU and memory, from /proc), and server configs with priced
models served by the fault upstream (tests/router/fault_server.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

TICKS = os.sysconf("SC_CLK_TCK")
ERROR_FIELDS = {"message", "type", "param", "code"}


# -- SPEC.md's error shape ------------------------------------------------------------------


def error_shape_problems(status: int, body: bytes) -> list[str]:
    """What is wrong with an error answer's body (empty when it is in SPEC.md's shape:
    `{"error": {"message", "type", "param", "code"}}`, message and type non-empty strings,
    param and code strings or null)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [f"{status}: the body is not JSON: {body[:200]!r}"]
    if not isinstance(payload, dict) or set(payload) != {"error"}:
        return [f"{status}: the body is not {{\"error\": ...}}: {body[:200]!r}"]
    error = payload["error"]
    if not isinstance(error, dict) or set(error) != ERROR_FIELDS:
        return [f"{status}: the error does not have exactly {sorted(ERROR_FIELDS)}: "
                f"{body[:200]!r}"]
    problems = [f"{status}: error.{name} is not a non-empty string: {body[:200]!r}"
                for name in ("message", "type")
                if not isinstance(error[name], str) or not error[name]]
    problems += [f"{status}: error.{name} is neither a string nor null: {body[:200]!r}"
                 for name in ("param", "code") if not isinstance(error[name], str | None)]
    if isinstance(error["message"], str) and "Traceback (most recent" in error["message"]:
        problems.append(f"{status}: the message carries a stack trace")
    return problems


ANTHROPIC_ERROR_TYPES = {"invalid_request_error", "authentication_error", "billing_error",
                         "permission_error", "not_found_error", "request_too_large",
                         "rate_limit_error", "api_error", "timeout_error", "overloaded_error"}


def anthropic_error_problems(status: int, body: bytes) -> list[str]:
    """What is wrong with an error answer of an Anthropic path (empty when it is in
    Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [f"{status}: the body is not JSON: {body[:200]!r}"]
    if not isinstance(payload, dict) or set(payload) != {"type", "error"} or (
            payload["type"] != "error") or not isinstance(payload["error"], dict):
        return [f"{status}: not Anthropic's error shape: {body[:200]!r}"]
    error = payload["error"]
    problems = [] if set(error) == {"type", "message"} else [
        f"{status}: the error does not have exactly type and message: {body[:200]!r}"]
    if error.get("type") not in ANTHROPIC_ERROR_TYPES:
        problems.append(f"{status}: not one of Anthropic's error types: {body[:200]!r}")
    message = error.get("message")
    if not isinstance(message, str) or not message or "Traceback (most recent" in message:
        problems.append(f"{status}: error.message is empty or a stack trace: {body[:200]!r}")
    return problems


def assert_error_shape(response: httpx.Response) -> dict[str, Any]:
    """The `error` object of an error answer, failing unless it is in SPEC.md's shape."""
    problems = error_shape_problems(response.status_code, response.content)
    assert not problems, problems
    error: dict[str, Any] = response.json()["error"]
    return error


# -- what a server process spends ------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Cost:
    """What the server spent while a block ran: CPU seconds, and how far its resident
    memory rose above where it stood at the start (sampled every 20 ms)."""

    cpu_s: float = 0.0
    peak_rss_delta: int = 0


@contextmanager
def measured(pid: int) -> Iterator[Cost]:
    cost = Cost()
    start_cpu, start_rss = cpu_seconds(pid), rss_bytes(pid)
    peak = start_rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            try:
                peak = max(peak, rss_bytes(pid))
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield cost
    finally:
        done.set()
        sampler.join()
        try:
            peak = max(peak, rss_bytes(pid))
            cost.cpu_s = cpu_seconds(pid) - start_cpu
        except OSError:  # the process is gone
            pass
        cost.peak_rss_delta = peak - start_rss


class HealthWatch:
    """Polls GET /health while a block runs: the slowest answer and how many failed."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.slowest_s = 0.0
        self.failures = 0
        self.polls = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._done.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(f"{self.base_url}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                self.polls += 1
                self.failures += not ok
                self._done.wait(0.1)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


# -- server configs -------------------------------------------------------------------------


def fault_model(model_id: str, upstream: str, fault_url: str, *, input_price: int = 1,
                output_price: int = 2, **deployment: Any) -> str:
    """A priced [[models]] entry served by the fault upstream in mode `upstream`."""
    lines = ["[[models]]", f'id = "{model_id}"', f"input_price = {input_price}",
             f"output_price = {output_price}", "", "[[models.deployments]]",
             f'base_url = "{fault_url}/v1"', f'upstream_model = "{upstream}"']
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in deployment.items()]
    return "\n".join(lines) + "\n\n"


# -- the suite's figures ---------------------------------------------------------------------

LONG = os.environ.get("MODELYARD_ADVERSARIAL_LONG") == "1"
"""The long run: more examples, more requests, more faults (benchmarks/adversarial.py)."""
FIGURES_ENV = "MODELYARD_ADVERSARIAL_FIGURES"


def record(**counts: int) -> None:
    """Add `counts` to the figures file named by MODELYARD_ADVERSARIAL_FIGURES (JSON), if
    set: requests fuzzed, 5xx seen, faults injected, money unaccounted for, ..."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    figures_file = Path(path)
    figures: dict[str, int] = orjson.loads(figures_file.read_bytes()) \
        if figures_file.exists() and figures_file.stat().st_size else {}
    for name, count in counts.items():
        figures[name] = figures.get(name, 0) + count
    figures_file.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
