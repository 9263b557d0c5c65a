"""Cache-aware routing benchmark: two engine replicas behind a gateway, multi-turn chats.

Two `modelyard serve` processes run the default model (small contexts: `--slots`
sequences of 1024 tokens, 4 by default, and each keeps at most 2048 cells of finished
prompts in its free slots; one llama.cpp thread each, so the two share the machine's 2
cores). A third `modelyard serve`, with no engine,
is the gateway: its catalog holds the same two replicas twice, as passthrough deployments
(another modelyard) under two model ids,

- `bench/affinity`: the deployments keep their prefix cache (`prefix_cache`, on by default
  for passthrough), so `[router] affinity` routes by the conversation's start;
- `bench/random`: the same deployments with `prefix_cache = false`: weighted random.

The workload: conversations, each a first user message holding a different snippet of code
(about 300 tokens) and then follow-up questions; each turn repeats the earlier turns with
their answers (streamed, at most `--max-tokens`, greedy). `--concurrency` conversations run at
once, the next starts when one ends; between turns the user thinks (uniformly 0 to twice
`--think` seconds), while the other conversations' turns reach the replicas. So a
replica's prefix cache (a few conversations) is smaller than what all active conversations
need, as it is for a server with many users: spread at random, every replica sees every
conversation; by affinity, each sees its own half. Each model gets its own conversations
(different snippets), so neither phase finds the other's prompts cached; the phases run
one after the other in one run.

Reported per phase: the share of prompt tokens the replicas served from their prefix cache
(usage.prompt_tokens_details.cached_tokens / prompt_tokens, summed), the same for turns
after the first, time to first token (first content chunk) p50 and p90, the wall time and
how the requests split between the replicas. Target: affinity's cached share at least 2x
random's.

    .venv/bin/python benchmarks/bench_affinity.py [--conversations 32] [--turns 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import (  # noqa: E402
    exit_on_sigterm,
    machine,
    resolve_default_model,
    save_results,
    stop_processes,
)
from bench_gateway import _wait  # noqa: E402

from tests.e2e.server import free_port, metric_value, modelyard_command  # noqa: E402

SYSTEM = "You are a senior engineer. Answer in at most two sentences."
FOLLOW_UPS = ["What does this code do?", "Name one bug or risk in it.",
              "How would you test it?", "Suggest a better name for the main function.",
              "Which line would you change first, and why?", "Is it thread-safe?"]
WORDS = ["order", "user", "cache", "invoice", "ticket", "batch", "token", "report", "queue",
         "price", "stock", "route", "event", "shard", "record", "window", "budget", "metric"]


def snippet(rng: random.Random) -> str:
    """A small, unique Python function (about 300 tokens)."""
    a, b, c = rng.sample(WORDS, 3)
    lines = [f"def merge_{a}_{b}(items, limit={rng.randint(2, 99)}):",
             f'    """Merge {a} entries into {b} groups, keeping the newest {c}."""',
             "    groups = {}"]
    for i in range(rng.randint(5, 7)):
        x, y, z = rng.sample(WORDS, 3)
        lines += [f"    for {x}_{i} in items:",
                  f"        key = ({x}_{i}.{y}, {x}_{i}.{z} % {rng.randint(3, 97)})",
                  f"        groups.setdefault(key, []).append({x}_{i})"]
    lines += ["    return {k: v[-limit:] for k, v in groups.items()}"]
    return "Review this code:\n```python\n" + "\n".join(lines) + "\n```"


@dataclass
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft: float


@dataclass
class Phase:
    model: str
    turns: list[Turn] = field(default_factory=list)
    failed: int = 0
    wall: float = 0.0
    split: list[float] = field(default_factory=list)

    def cached_share(self, first_turn: bool = True) -> float:
        kept = [t for t in self.turns if first_turn or t.turn > 0]
        prompt = sum(t.prompt_tokens for t in kept)
        return sum(t.cached_tokens for t in kept) / prompt if prompt else float("nan")

    def ttft_ms(self, q: float) -> float:
        values = sorted(t.ttft for t in self.turns)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else \
            float("nan")


async def _turn(client: httpx.AsyncClient, model: str, messages: list[dict[str, Any]],
                max_tokens: int) -> tuple[str, float, int, int]:
    """The answer, time to its first content chunk, prompt and cached tokens."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, text, usage = 0.0, "", None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            for choice in chunk.get("choices") or ():
                piece = choice.get("delta", {}).get("content") or ""
                if piece and not first:
                    first = time.perf_counter() - started
                text += piece
            usage = chunk.get("usage") or usage
    if usage is None:
        raise RuntimeError("no usage in the stream")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return text, first or time.perf_counter() - started, usage["prompt_tokens"], cached


async def run_phase(url: str, key: str, model: str, seed: int, args: argparse.Namespace,
                    ) -> Phase:
    rng = random.Random(seed)
    conversations = [snippet(rng) for _ in range(args.conversations)]
    phase = Phase(model)
    pending = list(enumerate(conversations))

    async def worker(client: httpx.AsyncClient) -> None:
        while pending:
            index, code = pending.pop(0)
            messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": code}]
            for turn in range(args.turns):
                try:
                    text, ttft, prompt, cached = await _turn(client, model, messages,
                                                             args.max_tokens)
                except (httpx.HTTPError, RuntimeError) as exc:
                    print(f"  {model} conversation {index} turn {turn}: {exc}", flush=True)
                    phase.failed += 1
                    break
                phase.turns.append(Turn(index, turn, prompt, cached, ttft))
                if turn + 1 < args.turns:
                    await asyncio.sleep(rng.uniform(0, 2 * args.think))
                messages += [{"role": "assistant", "content": text},
                             {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    phase.wall = time.perf_counter() - started
    return phase


def _start(work: Path, name: str, config: str, data_dir: Path,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str, str]:
    """A `modelyard serve` with its own SQLite database: the process, URL and admin key."""
    folder = work / name
    folder.mkdir()
    port = free_port()
    (folder / "modelyard.toml").write_text(
        f'database_url = "sqlite:///{folder / "platform.db"}"\nlog_level = "warning"\n'
        f"[embedding]\nenabled = false\n{config}")
    log = folder / "server.log"
    process = subprocess.Popen(
        [*modelyard_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--config", str(folder / "modelyard.toml")],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MODELYARD_DATA_DIR": str(data_dir), **(env or {})})
    return process, f"http://127.0.0.1:{port}", str(log)


def _key(url: str, log: str, process: subprocess.Popen[bytes]) -> str:
    """Wait for the server, then an account with a balance and a key on it."""
    _wait(f"{url}/health", process, seconds=300)
    admin = Path(log).read_text().split("admin key: ")[1].split()[0]
    auth = {"Authorization": f"Bearer {admin}"}
    httpx.post(f"{url}/admin/accounts", json={"name": "bench", "balance": "100000"},
               headers=auth, timeout=10).raise_for_status()
    key = httpx.post(f"{url}/admin/keys", json={"account": "bench"}, headers=auth,
                     timeout=10).json()["key"]
    return str(key)


def _gateway_config(replicas: list[str]) -> str:
    models = []
    for model, cached in (("bench/affinity", None), ("bench/random", False)):
        lines = [f'[[models]]\nid = "{model}"\ncontext_length = 1024\n']
        for i, url in enumerate(replicas):
            lines.append(f'[[models.deployments]]\nbase_url = "{url}/v1"\n'
                         f'upstream_model = "qwen2.5-coder-0.5b-instruct"\n'
                         f'profile = "passthrough"\nname = "replica-{i}"\n'
                         f'api_key_env = "MODELYARD_BENCH_KEY_{i}"\n'
                         "first_token_timeout = 300\n"
                         + ("" if cached is None else "prefix_cache = false\n"))
        models.append("".join(lines))
    # A slow turn on a busy machine is no deployment failure: no breaker opens here.
    return "[router]\naffinity = true\nbreaker_failures = 1000\n" + "\n".join(models)


def _split(metrics: str, model: str, replicas: int) -> list[float]:
    counts = [metric_value(metrics, "modelyard_deployment_tries_total",
                           f'deployment="replica-{i}",model="{model}",outcome="ok"')
              for i in range(replicas)]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--slots", type=int, default=4,
                        help="each replica's max_sequences (of 1024 tokens); its free slots "
                             "keep at most 2048 cells of finished conversations either way")
    parser.add_argument("--think", type=float, default=0.5,
                        help="mean seconds between a turn's answer and the next turn")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--model-path", type=Path, default=None)
    args = parser.parse_args()
    exit_on_sigterm()   # killed, it still stops the three servers (the `finally` below)
    resolve_default_model(args)
    work = Path(tempfile.mkdtemp(prefix="bench-affinity-"))
    processes: list[subprocess.Popen[bytes]] = []
    replica_config = (f'[model]\nsource = "{args.model_path}"\n'
                      f"[engine]\nmax_sequences = {args.slots}\ncontext_per_sequence = 1024\n"
                      "threads = 1\n")
    try:
        started: list[tuple[subprocess.Popen[bytes], str, str]] = []
        for i in range(2):   # each process is listed as soon as it runs, to be stopped
            started.append(_start(work, f"replica-{i}", replica_config, args.data_dir))
            processes.append(started[-1][0])
        keys = [_key(url, log, p) for p, url, log in started]
        urls = [url for _, url, _ in started]
        gateway, gateway_url, gateway_log = _start(
            work, "gateway", _gateway_config(urls), args.data_dir,
            {f"MODELYARD_BENCH_KEY_{i}": key for i, key in enumerate(keys)})
        processes.append(gateway)
        key = _key(gateway_url, gateway_log, gateway)
        print(f"replicas {urls} ({args.slots} slots each), gateway {gateway_url}; "
              f"{args.conversations} conversations x {args.turns} turns, "
              f"{args.concurrency} at once", flush=True)
        phases: list[Phase] = []
        for seed, model in ((1, "bench/random"), (2, "bench/affinity")):
            before = _split(httpx.get(f"{gateway_url}/metrics").text, model, 2)
            phase = asyncio.run(run_phase(gateway_url, key, model, seed, args))
            after = _split(httpx.get(f"{gateway_url}/metrics").text, model, 2)
            phase.split = [a - b for a, b in zip(after, before, strict=True)]
            phases.append(phase)
            print(f"  {model}: {len(phase.turns)} turns in {phase.wall:.1f} s, cached share "
                  f"{phase.cached_share():.1%}, TTFT p50 {phase.ttft_ms(0.5):.0f} ms",
                  flush=True)
    finally:
        stop_processes(processes)
    report(phases, args)


def report(phases: list[Phase], args: argparse.Namespace) -> None:
    random_phase, affinity = phases
    print("\n| routing | turns | cached share (all turns) | cached share (turns 2+) | "
          "TTFT p50 ms | TTFT p90 ms | wall s | requests per replica | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, phase in (("weighted random", random_phase), ("affinity", affinity)):
        split = " / ".join(f"{int(n)}" for n in phase.split)
        print(f"| {name} | {len(phase.turns)} | {phase.cached_share():.1%} | "
              f"{phase.cached_share(False):.1%} | {phase.ttft_ms(0.5):.0f} | "
              f"{phase.ttft_ms(0.9):.0f} | {phase.wall:.1f} | {split} | {phase.failed} |")
    ratio = affinity.cached_share() / random_phase.cached_share() \
        if random_phase.cached_share() else float("inf")
    print(f"\ncached share, affinity / random: {ratio:.2f}x (target 2x: "
          f"{'PASS' if ratio >= 2 else 'MISS'}); TTFT p50 "
          f"{affinity.ttft_ms(0.5):.0f} ms against {random_phase.ttft_ms(0.5):.0f} ms")
    save_results("affinity", {
        "machine": machine("llama-cpp-python"),
        "phases": [{"model": p.model, "turns": len(p.turns), "failed": p.failed,
                    "wall_s": p.wall, "cached_share": p.cached_share(),
                    "cached_share_after_first": p.cached_share(False),
                    "ttft_p50_ms": p.ttft_ms(0.5), "ttft_p90_ms": p.ttft_ms(0.9),
                    "ttft_mean_ms": statistics.fmean(t.ttft for t in p.turns) * 1000
                    if p.turns else None, "requests_per_replica": p.split}
                   for p in phases],
        "ratio": ratio}, args)


if __name__ == "__main__":
    main()
