"""Speculative decoding by prompt lookup: output tokens/s with it on and off, and against
llama.cpp's own server with its n-gram speculation, on the same prompts.

Two workloads, each at every concurrency level (a wave of `concurrency` requests at once,
temperature 0, streamed):

- edit: the prompt holds a ~150-line Python file and asks for the whole file back with one
  function changed (each request of a wave a different function);
- chat: plain questions whose answers repeat little of the prompt.

Each wave is sent first with max_tokens 1, untimed, so its prompts are in every server's
prompt cache when it is sent again, timed (`--rounds` times; the median is reported): the
time is the decoding's. Servers, one after
another on the same GGUF and thread count: modelyard with `[engine] speculation` off,
modelyard with it on (drafts from the request's own text only: `speculation_history` off,
since the timed rounds repeat their requests), and llama-server (built from the llama.cpp
that llama-cpp-python vendors, path given by --llama-server) with `--spec-type
ngram-simple` (and, with --llama-server-plain, without). With --history, modelyard also runs
with speculation and `speculation_history` on: its first timed wave of each cell has no
earlier answers to draft from, and the waves after it repeat the first's requests from the
same account, as a client's retry would; both are reported.

    python benchmarks/bench_speculation.py --llama-server PATH [--history] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from _common import cpu_name, exit_on_sigterm, resolve_default_model, save_results, stop_process
from bench_serving import free_port, stream_one, wait_healthy

FUNCTIONS = 15


def source_file() -> str:
    """A ~150-line module of small functions, the same every run."""
    parts = ['"""Inventory helpers: prices, stock levels and reports."""', "",
             "from __future__ import annotations", "", "import math", ""]
    for i in range(FUNCTIONS):
        parts += [
            "",
            f"def item_{i}_total(prices: list[float], quantity: int) -> float:",
            f'    """The total of item group {i} for `quantity` units, rounded to cents."""',
            "    subtotal = 0.0",
            "    for price in prices:",
            f"        subtotal += price * quantity * {1 + i / 10:.1f}",
            f"    if subtotal > {100 * (i + 1)}:",
            f"        subtotal -= subtotal * 0.0{i % 9 + 1}",
            "    return math.floor(subtotal * 100) / 100",
        ]
    return "\n".join(parts) + "\n"


def edit_prompts(n: int) -> list[str]:
    code = source_file()
    changes = ["so that it also rejects a negative quantity with ValueError",
               "so that it uses math.fsum over a generator instead of the loop",
               "so that it rounds to whole units instead of cents",
               "so that the discount applies only above twice the threshold"]
    return [f"Here is a Python file:\n\n```python\n{code}```\n\nChange the function "
            f"`item_{i % FUNCTIONS}_total` {changes[i % len(changes)]}. Reply with the whole "
            "updated file in one code block and nothing else." for i in range(n)]


CHAT_TOPICS = ["why the sky is blue", "how a bicycle stays upright", "what a hash table is",
               "how vaccines train the immune system", "why bread rises",
               "how a compiler differs from an interpreter", "what causes the seasons",
               "how noise-cancelling headphones work"]


def chat_prompts(n: int) -> list[str]:
    return [f"Explain {CHAT_TOPICS[i % len(CHAT_TOPICS)]} to a curious teenager, in two "
            "short paragraphs." for i in range(n)]


@contextlib.contextmanager
def server_process(command: list[str], env: dict[str, str], workdir: Path, name: str,
                   health: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc, log_path
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def modelyard(args: argparse.Namespace, model_path: Path, speculation: bool,
              history: bool = False) -> Iterator[tuple[str, str, str]]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    config = workdir / "config.toml"
    config.write_text(
        f'log_level = "warning"\ndatabase_url = "sqlite:///{workdir / "platform.db"}"\n'
        "\n[engine]\n"
        f"max_sequences = {max(args.concurrency)}\n"
        f"context_per_sequence = {args.context}\n"
        f"threads = {args.threads}\n"
        f"speculation = {'true' if speculation else 'false'}\n"
        f"speculation_history = {'true' if history else 'false'}\n"
        "\n[platform]\nmax_concurrent_per_key = 0\nmax_concurrent_per_account = 0\n",
        encoding="utf-8")
    port = free_port()
    command = [sys.executable, "-m", "modelyard.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--model", str(model_path), "--config", str(config)]
    env = {**os.environ, "MODELYARD_DATA_DIR": str(args.data_dir)}
    with server_process(command, env, workdir, "modelyard", "/health") as (proc, log):
        base = f"http://127.0.0.1:{port}"
        model = wait_healthy(proc, base, log)
        key = re.search(r"admin key: (\S+)", log.read_text())
        if key is None:
            raise RuntimeError("modelyard serve printed no admin key")
        yield base, model, key.group(1)


@contextlib.contextmanager
def llama_server(args: argparse.Namespace, model_path: Path, speculation: bool
                 ) -> Iterator[tuple[str, str, str]]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-spec-llama-"))
    slots = max(args.concurrency)
    port = free_port()
    command = [str(args.llama_server), "-m", str(model_path), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(slots), "-c", str(slots * args.context),
               "-t", str(args.threads), "-tb", str(args.threads), "-fa", "on", "--no-repack",
               "--no-webui"]
    if speculation:
        command += ["--spec-type", "ngram-simple"]
    with server_process(command, dict(os.environ), workdir, "llama-server", "/health") as (
            proc, log):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not start")
            time.sleep(0.5)
        yield base, "default", "none"


async def wave(base: str, model: str, key: str, prompts: list[str], max_tokens: int
               ) -> tuple[int, float]:
    """Send `prompts` at once; (output tokens, wall seconds)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(900),
                                 limits=httpx.Limits(max_connections=len(prompts) + 4),
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, base, model, p, max_tokens)
                                         for p in prompts))
        return sum(r.completion_tokens for r in results), time.perf_counter() - start


def measure(args: argparse.Namespace, target: tuple[str, str, str]) -> dict[str, float]:
    base, model, key = target
    rates: dict[str, float] = {}
    for workload, make, max_tokens in (("edit", edit_prompts, args.edit_tokens),
                                       ("chat", chat_prompts, args.chat_tokens)):
        for level in args.concurrency:
            prompts = make(level)
            asyncio.run(wave(base, model, key, prompts, 1))  # fills the prompt caches
            measured = []
            for _ in range(args.rounds):
                tokens, wall = asyncio.run(wave(base, model, key, prompts, max_tokens))
                measured.append(tokens / wall)
                print(f"  {workload} c={level}: {tokens} tokens in {wall:.1f}s = "
                      f"{tokens / wall:.1f} tok/s", flush=True)
            rates[f"{workload}@{level}"] = statistics.median(measured)
            rates[f"{workload}@{level} first"] = measured[0]
            if len(measured) > 1:
                rates[f"{workload}@{level} again"] = statistics.median(measured[1:])
    return rates


def table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    has_llama = "llama-server ngram" in results
    head = ("| workload | concurrency | off tok/s | on tok/s | on/off |"
            + (" llama-server ngram tok/s | on/llama-server |" if has_llama else "")
            + " target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for workload in ("edit", "chat"):
        for level in args.concurrency:
            key = f"{workload}@{level}"
            off, on = results["off"][key], results["on"][key]
            target = (">= 2x" if level == 1 else "") if workload == "edit" else ">= 0.95x"
            if target:
                bar = 2.0 if workload == "edit" else 0.95
                target += " " + ("PASS" if on / off >= bar else "MISS")
            row = f"| {workload} | {level} | {off:.1f} | {on:.1f} | {on / off:.2f}x |"
            if has_llama:
                llama = results["llama-server ngram"][key]
                row += f" {llama:.1f} | {on / llama:.2f}x |"
                if workload == "edit":
                    target += f"{'; ' if target else ''}ahead of llama-server " + (
                        "PASS" if on > llama else "MISS")
            lines.append(row + f" {target} |")
    if "on + history" in results:
        history = results["on + history"]
        lines += ["", "| workload | concurrency | off tok/s | on + history, first wave | "
                  "on + history, repeated waves | repeated / off |", "|---|---|---|---|---|---|"]
        for workload in ("edit", "chat"):
            for level in args.concurrency:
                key = f"{workload}@{level}"
                again = history.get(f"{key} again", float("nan"))
                lines.append(f"| {workload} | {level} | {results['off'][key]:.1f} | "
                             f"{history[f'{key} first']:.1f} | {again:.1f} | "
                             f"{again / results['off'][key]:.2f}x |")
    if "llama-server plain" in results:
        lines.append("")
        lines.append("llama-server without speculation: " + ", ".join(
            f"{k} {v:.1f}" for k, v in results["llama-server plain"].items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed waves per workload and level; the median is reported")
    parser.add_argument("--edit-tokens", type=int, default=192)
    parser.add_argument("--chat-tokens", type=int, default=96)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="llama-server binary (skipped when not given)")
    parser.add_argument("--llama-server-plain", action="store_true",
                        help="also run llama-server without speculation")
    parser.add_argument("--history", action="store_true",
                        help="also run modelyard with drafts from the account's earlier "
                             "outputs (speculation_history); its timed waves after the first "
                             "repeat the first's requests, as a retry would")
    parser.add_argument("--quick", action="store_true",
                        help="concurrency 1 only, short answers (a smoke test)")
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.edit_tokens, args.chat_tokens = "1", 48, 24
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()   # so the servers are still stopped (the `with` exits)
    resolve_default_model(args)
    model_path: Path = args.model_path
    print(f"{cpu_name()}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}; "
          f"edit answers {args.edit_tokens} tokens, chat {args.chat_tokens}", flush=True)
    started = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    runs: list[tuple[str, Any, bool]] = [("off", modelyard, False), ("on", modelyard, True)]
    if args.history:
        runs.append(("on + history", functools.partial(modelyard, history=True), True))
    if args.llama_server is not None:
        runs.append(("llama-server ngram", llama_server, True))
        if args.llama_server_plain:
            runs.append(("llama-server plain", llama_server, False))
    for name, start, speculation in runs:
        print(f"{name}:", flush=True)
        with start(args, model_path, speculation) as target:
            results[name] = measure(args, target)
    print(f"\n{table(results, args)}\n\n({time.perf_counter() - started:.0f} s in all)")
    save_results("speculation", {"results": results}, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
