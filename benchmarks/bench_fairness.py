"""Fair share between accounts: a light account's time to first token while another floods.

Account A keeps `--flood` long requests in flight (each answered one starts the next);
account B sends one short streamed request every `--interval` seconds and times its first
token. The scenarios run one after another, each scenario's `[engine]` settings on a
fresh `modelyard serve` with the platform on (SQLite), otherwise the default settings:

- `idle`: B alone on an idle server;
- `fair share`: B beside A's flood, the defaults (fair share, `reserved_slots = 1`,
  `heavy_prefill_per_step = 64`, `pause_heavy_every = 4`, `interrupt_heavy_steps`);
- `fair share, no interrupt`: the same with `interrupt_heavy_steps = false` (B's request
  waits for the step in flight when it comes);
- `fair share, no pause`: the same with `pause_heavy_every = 0` (the step that reads B's
  prompt still decodes A's answers);
- `fair share, no cap` (only with `--only`): `heavy_prefill_per_step = 0` (A's prompts
  may fill a whole 512-token step while B is about);
- `FIFO`: `fair_share = false` (first come, first served across accounts);
- `fair share, no pause, no reserve` (only with `--only`): also `reserved_slots = 0` (B
  waits for one of A's answers to end before it gets a slot).

Prints B's TTFT p50 and p99, the ratio of each p50 to idle's, and the tokens per second
the engine generated for A in the window (what fairness costs the flood; from /metrics,
less B's). `--only` runs some of the scenarios (and idle). Run after nothing else loads
the machine:

    .venv/bin/python benchmarks/bench_fairness.py            # about 8 minutes
    .venv/bin/python benchmarks/bench_fairness.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from _common import exit_on_sigterm, machine, result_row, save_results, stop_process

MODEL = "qwen2.5-coder-0.5b-instruct"
GENERATED = "modelyard_generated_tokens_total"
INTERRUPTED = "modelyard_interrupted_steps_total"
ADMIN_KEY_LINE = re.compile(r"admin key: (sk-my-\S+)")
FLOOD_TEXT = (
    "Summarize the following notes about a storage system in one paragraph. The system "
    "keeps records in pages of four kilobytes, grouped in extents of sixty-four pages; a "
    "free-space map tracks which extents hold room; writes go to a log first and are "
    "applied to pages by a background writer; readers take no locks and see a snapshot "
    "as of their start; old versions are removed by a vacuum pass that runs when a "
    "table's dead rows pass a fifth of its live rows; indexes are B-trees whose leaves "
    "link to their neighbours; checkpoints flush dirty pages every five minutes or after "
    "a gigabyte of log, whichever comes first; replicas stream the log and replay it."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Engine = dict[str, int | bool]
"""`[engine]` settings of a scenario's server, beside the benchmark's own."""

SCENARIOS: list[tuple[str, Engine, bool]] = [
    ("idle", {}, False),
    ("fair share", {}, True),
    ("fair share, no interrupt", {"interrupt_heavy_steps": False}, True),
    ("fair share, no cap", {"heavy_prefill_per_step": 0}, True),
    ("fair share, no pause", {"pause_heavy_every": 0}, True),
    ("FIFO", {"fair_share": False}, True),
    ("fair share, no pause, no reserve", {"pause_heavy_every": 0, "reserved_slots": 0}, True),
]
"""(name, `[engine]` settings, whether A floods); the defaults are the server's own."""
OPTIONAL = {"fair share, no cap", "fair share, no pause, no reserve"}
"""Scenarios run only when named with --only (B's wait can be minutes)."""


@contextlib.contextmanager
def server(workdir: Path, engine: Engine, threads: int) -> Iterator[tuple[str, str]]:
    """`modelyard serve` with the platform on; (base URL, admin key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "modelyard.toml"
    settings = "".join(f"{key} = {str(value).lower()}\n" for key, value in engine.items())
    config.write_text(f'database_url = "sqlite:///{workdir / "platform.db"}"\n'
                      f"[engine]\n{settings}threads = {threads}\n"
                      "max_waiting = 1024\n"
                      "[platform]\nmax_concurrent_per_key = 1000\n"
                      "max_concurrent_per_account = 1000\n")
    port = free_port()
    script = Path(sys.executable).with_name("modelyard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "modelyard.cli"]
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command, "serve", "--host", "127.0.0.1", "--port", str(port),
             "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        found = ADMIN_KEY_LINE.search(log_path.read_text(errors="replace"))
        if found is None:
            raise RuntimeError("the server printed no admin key")
        yield base, found.group(1)
    finally:
        stop_process(process)


def account_key(base: str, admin_key: str, account: str) -> str:
    headers = {"Authorization": f"Bearer {admin_key}"}
    httpx.post(f"{base}/admin/accounts", json={"name": account, "balance": "1000000"},
               headers=headers, timeout=30).raise_for_status()
    created = httpx.post(f"{base}/admin/keys", json={"account": account}, headers=headers,
                         timeout=30)
    created.raise_for_status()
    return str(created.json()["key"])


async def flood(client: httpx.AsyncClient, key: str, args: argparse.Namespace,
                counts: dict[str, int]) -> None:
    """One of A's request loops: a long request, then the next, until cancelled."""
    while True:
        counts["sent"] += 1
        body = {"model": MODEL, "max_tokens": args.flood_max_tokens, "temperature": 0.7,
                "messages": [{"role": "user",
                              "content": f"Note {counts['sent']}. {FLOOD_TEXT}"}]}
        response = await client.post("/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"})
        if response.status_code != 200:
            counts["errors"] += 1
            await asyncio.sleep(0.5)


async def light_request(client: httpx.AsyncClient, key: str,
                        index: int) -> tuple[float, int, float, int]:
    """Seconds from sending B's streamed request to its first content; its tokens; when it
    ended (perf_counter); its prompt tokens found in the prefix cache."""
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Question {index}: what is "
                                                     f"{index} plus {index + 1}?"}]}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        ttft, tokens, cached = None, 0, 0
        async for line in response.aiter_lines():   # to the end: its slot is free again
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get(
                    "cached_tokens", 0)
            delta = chunk["choices"]
            if ttft is None and delta and delta[0]["delta"].get("content"):
                ttft = time.perf_counter() - started
    if ttft is None:
        raise RuntimeError("B's answer carried no content")
    return ttft, tokens, time.perf_counter(), cached


async def scenario(base: str, admin_key: str, args: argparse.Namespace,
                   with_flood: bool) -> dict[str, float]:
    suffix = os.urandom(3).hex()
    a_key = account_key(base, admin_key, f"flood-{suffix}")
    b_key = account_key(base, admin_key, f"light-{suffix}")
    limits = httpx.Limits(max_connections=args.flood + 8, max_keepalive_connections=args.flood + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client, \
            httpx.AsyncClient(base_url=base, timeout=60) as probe:   # never queued behind A
        await light_request(client, b_key, -1)   # warm the path (not counted)
        counts = {"sent": 0, "errors": 0}
        loops = ([asyncio.create_task(flood(client, a_key, args, counts))
                  for _ in range(args.flood)] if with_flood else [])
        await asyncio.sleep(args.warmup if with_flood else 0)
        metrics = (await probe.get("/metrics")).text
        window_start = time.perf_counter()
        lights = []
        for index in range(args.light_requests):   # on time, whatever the answers do
            lights.append(asyncio.create_task(light_request(client, b_key, index)))
            await asyncio.sleep(window_start + (index + 1) * args.interval
                                - time.perf_counter())
        after = (await probe.get("/metrics")).text
        generated = gauge(after, GENERATED) - gauge(metrics, GENERATED)
        interrupted = gauge(after, INTERRUPTED) - gauge(metrics, INTERRUPTED)
        window_end = time.perf_counter()
        window = window_end - window_start
        answers = await asyncio.gather(*lights)
        ttfts = [answer[0] for answer in answers]
        light_tokens = sum(tokens for _, tokens, ended, _ in answers if ended <= window_end)
        flood_tokens = max(0.0, generated - light_tokens)
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    ttfts.sort()
    return {"ttft_p50_ms": statistics.median(ttfts) * 1000,
            "ttft_p99_ms": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))] * 1000,
            "flood_tokens_per_s": flood_tokens / window, "flood_errors": counts["errors"],
            "interrupted_steps": interrupted,
            "samples": len(ttfts),
            "light_cached_tokens": statistics.mean(answer[3] for answer in answers),
            "ttfts_ms": [round(ttft * 1000) for ttft in ttfts],
            "running_at_start": gauge(metrics, "modelyard_running_sequences"),
            "waiting_at_start": gauge(metrics, "modelyard_queue_depth")}


def gauge(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=64, help="A's requests in flight")
    parser.add_argument("--flood-max-tokens", type=int, default=160)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between B's")
    parser.add_argument("--light-requests", type=int, default=12)
    parser.add_argument("--warmup", type=float, default=20.0,
                        help="seconds of flood before B's first request")
    parser.add_argument("--threads", type=int, default=0,
                        help="llama.cpp threads (0: one per core; 1 holds up better on a "
                             "machine others are using)")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", default=[],
                        help="run only these scenarios (and idle): "
                             + "; ".join(name for name, _, _ in SCENARIOS[1:]))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    # Stopped from outside: still stop the server it started (the `with` blocks' exits).
    exit_on_sigterm()
    if args.quick:
        args.flood, args.light_requests, args.warmup = 24, 4, 6.0
    print(f"# fairness benchmark: {machine('llama-cpp-python')}", flush=True)
    results: dict[str, dict[str, float]] = {}
    chosen = [scenario for scenario in SCENARIOS
              if scenario[0] in args.only or scenario[0] == "idle"
              or (not args.only and scenario[0] not in OPTIONAL)]
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        index = 0
        while index < len(chosen):   # scenarios with the same settings share a server
            engine = chosen[index][1]
            group = []
            while index < len(chosen) and chosen[index][1] == engine:
                group.append(chosen[index])
                index += 1
            with server(Path(tmp) / str(index), engine, args.threads) as (base, admin_key):
                for name, _, with_flood in group:
                    results[name] = asyncio.run(
                        scenario(base, admin_key, args, with_flood=with_flood))
                    print(f"{name}: {results[name]}", flush=True)
    idle = results["idle"]["ttft_p50_ms"]
    print(f"\nA: {args.flood} requests in flight, up to {args.flood_max_tokens} tokens each; "
          f"B: one short request every {args.interval:g} s, {args.light_requests} timed\n")
    print("| scenario | A running / waiting | B TTFT p50 | B TTFT p99 | p50 / idle "
          "| A tokens/s | steps interrupted |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in results.items():
        print(f"| {name} | {row['running_at_start']:.0f} / {row['waiting_at_start']:.0f} | "
              f"{row['ttft_p50_ms']:.0f} ms | {row['ttft_p99_ms']:.0f} ms | "
              f"{row['ttft_p50_ms'] / idle:.1f}x | {row['flood_tokens_per_s']:.0f} | "
              f"{row['interrupted_steps']:.0f} |")
    print()
    for name in [name for name in results if name.startswith("fair share")]:
        ratio = results[name]["ttft_p50_ms"] / idle
        print(result_row("fairness", f"B's TTFT p50, {name} / idle", f"{ratio:.1f}x",
                         "within 2x", ratio <= 2.0))
    save_results("fairness", {"machine": machine("llama-cpp-python"), "results": results},
                 args)


if __name__ == "__main__":
    main()
