"""Gateway benchmark: what modelyard adds in front of an upstream, next to LiteLLM's proxy.

An instant upstream (tests/router/fault_server.py, answering at once) runs on loopback;
in front of it, one after another: `modelyard serve` with a catalog model routed to it
(platform on: key lookup, reservation, settlement and a usage record per request, SQLite),
and LiteLLM's proxy (`litellm --config`, a master key, no database) pointed at the same
upstream. For each, at fixed arrival rates (open loop), client latency of the full answer
is measured; its p50/p99 minus the same measurement made directly against the upstream
just before is the added latency. The gateway process's CPU time per request is read from
/proc. Then the rate is doubled from 100 requests/s until p99 added latency exceeds 50 ms
or requests fail (or halved, when 100/s fails already), and the gap between the last rate
that passed and the first that failed is bisected twice: the highest rate that passed is
the sustained rate.

    .venv/bin/python benchmarks/bench_gateway.py --litellm /tmp/litellm-venv/bin/litellm

LiteLLM goes in its own environment (`python -m venv /tmp/litellm-venv &&
/tmp/litellm-venv/bin/pip install 'litellm[proxy]'`), never into modelyard's. The load
generator is one Python process speaking HTTP/1.1 over asyncio streams (a pool of
keep-alive connections, far cheaper per request than an HTTP client library); on 2 cores it
still shares the machine with the gateway and the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import Pool, exit_on_sigterm, open_loop, stop_processes  # noqa: E402

from tests.e2e.server import free_port, modelyard_command  # noqa: E402

LITELLM_KEY = "sk-bench-" + "0" * 32
BODY = {"model": "bench/instant", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16}
TICKS = os.sysconf("SC_CLK_TCK")


class Target:
    """One endpoint under test: where to send, with which key, and which process serves it."""

    def __init__(self, url: str, key: str | None, pid: int | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path
        self.key = key
        self.pid = pid

    def payload(self, stream: bool) -> bytes:
        body = orjson.dumps({**BODY, "stream": stream})
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", f"Content-Length: {len(body)}"]
        if self.key:
            head.append(f"Authorization: Bearer {self.key}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    def cpu_seconds(self) -> float:
        """CPU time of the serving process and its children (LiteLLM may fork workers)."""
        if self.pid is None:
            return 0.0
        total = 0.0
        for pid in [self.pid, *_children(self.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / TICKS
        return total


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found + [g for c in found for g in _children(c)]


async def _run(target: Target, rate: float, seconds: float,
               stream: bool) -> tuple[list[float], int, float]:
    pool = Pool(target.port, target.host)
    payload = target.payload(stream)
    try:
        for _ in range(20):  # warm the connections
            await pool.request(payload)
        cpu = target.cpu_seconds()
        latencies, failed, _ = await open_loop(pool, payload, rate, seconds)
        cpu_per_request = (target.cpu_seconds() - cpu) / int(rate * seconds)
    finally:
        pool.close()
    return sorted(latencies), failed, cpu_per_request


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def measure(target: Target, direct: Target, rate: float, seconds: float,
            stream: bool) -> tuple[float, float, int, float]:
    """Added p50 and p99 (ms), failed requests, gateway CPU ms per request."""
    base, _, _ = asyncio.run(_run(direct, rate, seconds, stream))
    lat, failed, cpu = asyncio.run(_run(target, rate, seconds, stream))
    return (_pct(lat, 0.5) - _pct(base, 0.5), _pct(lat, 0.99) - _pct(base, 0.99), failed,
            cpu * 1000)


def sustained(target: Target, direct: Target, seconds: float, stream: bool,
              max_rate: float) -> float:
    """The highest rate that passes: doubling up from 100/s (or halving down to 6.25/s when
    100/s already fails), then the gap to the first failing rate bisected twice."""
    def passes(rate: float) -> bool:
        _, p99, failed, _ = measure(target, direct, rate, seconds, stream)
        return not failed and p99 < 50

    rate = 100.0
    if passes(rate):
        best = rate
        while rate * 2 <= max_rate and passes(rate * 2):
            best = rate = rate * 2
        if rate * 2 > max_rate:
            return best
        low, high = best, rate * 2
    else:
        high = rate
        while high > 6.25 and not passes(high / 2):
            high /= 2
        if high <= 6.25:
            return 0.0
        low = high / 2
    for _ in range(2):
        middle = (low + high) / 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return low


def _wait(url: str, process: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--litellm", help="the litellm executable of its own venv")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-rate", type=float, default=3200)
    args = parser.parse_args()
    exit_on_sigterm()   # killed, it still stops its servers (the `finally` below)
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    processes: list[subprocess.Popen[bytes]] = []
    log = open(work / "log.txt", "wb")  # noqa: SIM115
    try:
        up_port = free_port()
        processes.append(subprocess.Popen([sys.executable, "-m", "tests.router.fault_server",
                                           str(up_port)], cwd=ROOT, stdout=log, stderr=log))
        upstream = f"http://127.0.0.1:{up_port}"
        _wait(f"{upstream}/requests", processes[-1])
        direct = Target(f"{upstream}/v1/chat/completions", None, None)
        targets: dict[str, Target] = {}

        my_port = free_port()
        (work / "modelyard.toml").write_text(
            f'database_url = "sqlite:///{work / "platform.db"}"\nlog_level = "warning"\n'
            f'[[models]]\nid = "bench/instant"\ninput_price = 1\noutput_price = 2\n'
            f'[[models.deployments]]\nbase_url = "{upstream}/v1"\n'
            f'upstream_model = "ok:hello"\nprofile = "passthrough"\nmax_concurrency = 4096\n')
        my_log = work / "modelyard.log"
        processes.append(subprocess.Popen(
            [*modelyard_command(), "serve", "--host", "127.0.0.1", "--port", str(my_port),
             "--config", str(work / "modelyard.toml")],
            stdout=open(my_log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=dict(os.environ, MODELYARD_DATA_DIR=str(work / "data"))))
        mine = f"http://127.0.0.1:{my_port}"
        _wait(f"{mine}/health", processes[-1])
        admin = my_log.read_text().split("admin key: ")[1].split()[0]
        auth = {"Authorization": f"Bearer {admin}"}
        httpx.post(f"{mine}/admin/accounts", json={"name": "bench", "balance": "100000"},
                   headers=auth, timeout=10).raise_for_status()
        key = httpx.post(f"{mine}/admin/keys", json={"account": "bench"}, headers=auth,
                         timeout=10).json()["key"]
        targets["modelyard"] = Target(f"{mine}/v1/chat/completions", key, processes[-1].pid)
        if args.litellm:
            lite_port = free_port()
            (work / "litellm.yaml").write_text(
                "model_list:\n  - model_name: bench/instant\n    litellm_params:\n"
                f"      model: openai/ok:hello\n      api_base: {upstream}/v1\n"
                "      api_key: unused\n"
                f"general_settings:\n  master_key: {LITELLM_KEY}\n")
            processes.append(subprocess.Popen(
                [args.litellm, "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1",
                 "--port", str(lite_port)], stdout=log, stderr=log, cwd=work,
                env=dict(os.environ, LITELLM_LOG="ERROR")))
            lite = f"http://127.0.0.1:{lite_port}"
            _wait(f"{lite}/health/liveliness", processes[-1], 240)
            targets["litellm"] = Target(f"{lite}/v1/chat/completions", LITELLM_KEY,
                                        processes[-1].pid)

        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
              f"{args.seconds:.0f} s per point; added latency = gateway - direct, ms; "
              "CPU = the gateway process's CPU time per request at 100/s")
        print("| gateway | mode | p50 @100/s | p99 @100/s | CPU @100/s | p50 @500/s | "
              "p99 @500/s | highest rate with p99 added < 50 ms |")
        print("|---|---|---|---|---|---|---|---|")
        for name, target in targets.items():
            for stream in (False, True):
                cells = []
                for rate in (100, 500):
                    p50, p99, failed, cpu = measure(target, direct, rate, args.seconds,
                                                    stream)
                    cells += [f"{p50:.2f}", f"{p99:.2f}" + (f" ({failed} failed)"
                                                            if failed else "")]
                    if rate == 100:
                        cells.append(f"{cpu:.2f}")
                best = sustained(target, direct, args.seconds, stream, args.max_rate)
                mode = "stream" if stream else "non-stream"
                print(f"| {name} | {mode} | {' | '.join(cells)} | {best:.0f}/s |", flush=True)
    finally:
        stop_processes(processes)


if __name__ == "__main__":
    main()
