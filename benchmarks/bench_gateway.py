"""Gateway benchmark: what modelyard adds in front of an upstream, next to LiteLLM's proxy.

An instant upstream (tests/router/fault_server.py, answering at once) runs on loopback;
in front of it, one after another: `modelyard serve` with a catalog model routed to it
(platform on: key lookup, reservation, settlement and a usage record per request), and
LiteLLM's proxy (`litellm --config`, a master key, no database) pointed at the same upstream.
For each, at fixed arrival rates (open loop), client latency of the full answer is
measured; its p50/p99 minus the same measurement made directly against the upstream is the
added latency. Then the rate is doubled from 100 requests/s until p99 added latency
exceeds 50 ms or requests fail: the highest rate that passed is the sustained rate.

    .venv/bin/python benchmarks/bench_gateway.py --litellm /tmp/litellm-venv/bin/litellm

LiteLLM goes in its own environment (`python -m venv /tmp/litellm-venv &&
/tmp/litellm-venv/bin/pip install 'litellm[proxy]'`), never into modelyard's. The load
generator is one Python process (httpx) on the same machine: on 2 cores it competes with
the server under test, so rates above a few hundred per second measure both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.server import free_port, modelyard_command  # noqa: E402

LITELLM_KEY = "sk-bench-" + "0" * 32
BODY = {"model": "bench/instant", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16}


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


async def _one(client: httpx.AsyncClient, url: str, headers: dict[str, str],
               stream: bool) -> float | None:
    started = time.perf_counter()
    try:
        body = {**BODY, "stream": stream}
        if stream:
            async with client.stream("POST", url, json=body, headers=headers) as response:
                async for _ in response.aiter_bytes():
                    pass
                ok = response.status_code == 200
        else:
            response = await client.post(url, json=body, headers=headers)
            ok = response.status_code == 200
    except httpx.HTTPError:
        return None
    return time.perf_counter() - started if ok else None


async def _run(url: str, headers: dict[str, str], rate: float, seconds: float,
               stream: bool) -> tuple[list[float], int]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        for _ in range(20):  # warm the connections
            await _one(client, url, headers, stream)
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, url, headers, stream)))
        results = await asyncio.gather(*tasks)
    done = sorted(r for r in results if r is not None)
    return done, len(results) - len(done)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def measure(target: str, url: str, headers: dict[str, str], direct: str, rate: float,
            seconds: float, stream: bool) -> tuple[float, float, int]:
    base, _ = asyncio.run(_run(direct, {}, rate, seconds, stream))
    lat, failed = asyncio.run(_run(url, headers, rate, seconds, stream))
    return _pct(lat, 0.5) - _pct(base, 0.5), _pct(lat, 0.99) - _pct(base, 0.99), failed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--litellm", help="the litellm executable of its own venv")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-rate", type=float, default=3200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    processes: list[subprocess.Popen[bytes]] = []
    log = open(work / "log.txt", "wb")  # noqa: SIM115
    try:
        up_port = free_port()
        processes.append(subprocess.Popen([sys.executable, "-m", "tests.router.fault_server",
                                           str(up_port)], cwd=ROOT, stdout=log, stderr=log))
        upstream = f"http://127.0.0.1:{up_port}"
        _wait(f"{upstream}/requests", processes[-1])
        direct = f"{upstream}/v1/chat/completions"
        targets: dict[str, tuple[str, dict[str, str]]] = {}

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
        targets["modelyard"] = (f"{mine}/v1/chat/completions",
                                {"Authorization": f"Bearer {key}"})
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
            targets["litellm"] = (f"{lite}/v1/chat/completions",
                                  {"Authorization": f"Bearer {LITELLM_KEY}"})

        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
              f"{args.seconds:.0f} s per point; added latency = gateway - direct, ms")
        print("| gateway | mode | p50 @100/s | p99 @100/s | p50 @500/s | p99 @500/s | "
              "highest rate with p99 added < 50 ms |")
        print("|---|---|---|---|---|---|---|")
        for name, (url, headers) in targets.items():
            for stream in (False, True):
                cells = []
                for rate in (100, 500):
                    p50, p99, failed = measure(name, url, headers, direct, rate,
                                               args.seconds, stream)
                    cells += [f"{p50:.1f}", f"{p99:.1f}" + (f" ({failed} failed)"
                                                              if failed else "")]
                best, rate = 0.0, 100.0
                while rate <= args.max_rate:
                    _, p99, failed = measure(name, url, headers, direct, rate,
                                             args.seconds, stream)
                    if failed or p99 >= 50:
                        break
                    best, rate = rate, rate * 2
                mode = "stream" if stream else "non-stream"
                print(f"| {name} | {mode} | {' | '.join(cells)} | {best:.0f}/s |", flush=True)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=20)


if __name__ == "__main__":
    main()
