"""Serving benchmark: modelyard over HTTP vs llama-cpp-python's high-level API vs raw llama_decode.

All three run in one invocation, one after another (never sharing the CPU), on the same GGUF
and thread count. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import llama_cpp
import numpy as np
from _common import exit_on_sigterm, machine, resolve_default_model, save_results, stop_process

PROMPTS = [f"Write a short story about {topic}." for topic in (
    "a lighthouse keeper", "a lost robot", "a dragon who bakes bread", "a time-travelling cat",
    "a city under the sea", "the last tree on Mars", "a haunted library", "a chess prodigy",
    "a talking violin", "an astronaut's garden", "a river that flows uphill", "a clockmaker",
    "a forgotten satellite", "a desert caravan", "a ghost who cannot sleep", "a painter of storms",
)] + [f"Explain in detail how {topic} works." for topic in (
    "a hash table", "TCP congestion control", "garbage collection", "a compiler's parser",
    "public-key cryptography", "a B-tree index", "virtual memory", "the HTTP/2 protocol",
    "a CPU cache", "Git's object store", "a bloom filter", "consistent hashing",
    "the Raft consensus algorithm", "JPEG compression", "a neural network", "DNS resolution",
)]


@dataclass
class RequestResult:
    ttft_s: float
    tpot_s: float | None
    completion_tokens: int
    prompt_tokens: int


@dataclass
class Summary:
    requests: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float


def summarize(results: list[RequestResult], wall_s: float) -> Summary:
    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) * 1000 if values else float("nan")

    ttfts = [r.ttft_s for r in results]
    tpots = [r.tpot_s for r in results if r.tpot_s is not None]
    tokens = sum(r.completion_tokens for r in results)
    return Summary(len(results), tokens, wall_s, tokens / wall_s, pct(ttfts, 50), pct(ttfts, 99),
                   pct(tpots, 50), pct(tpots, 99))


def timing(t_send: float, t_first: float | None, t_last: float, tokens: int,
           prompt_tokens: int) -> RequestResult:
    if t_first is None:
        raise RuntimeError("the response carried no content")
    tpot = (t_last - t_first) / (tokens - 1) if tokens > 1 else None
    return RequestResult(t_first - t_send, tpot, tokens, prompt_tokens)


# -- modelyard over HTTP ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def modelyard_server(args: argparse.Namespace, model_path: Path
                     ) -> Iterator[tuple[str, str, str]]:
    """Start `modelyard serve` on a fresh platform database; yield (base URL, model id, the
    admin key it printed); stop it on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-modelyard-"))
    config = workdir / "config.toml"
    config.write_text(
        f'log_level = "warning"\ndatabase_url = "sqlite:///{workdir / "platform.db"}"\n'
        '\n[engine]\n'
        f"max_sequences = {args.max_sequences}\n"
        f"context_per_sequence = {args.context_per_sequence}\n"
        f"step_token_budget = {args.step_token_budget}\n"
        f"max_waiting = {max(256, 2 * max(args.concurrency))}\n"
        f"threads = {args.threads}\n"
        f"flash_attention = {'true' if args.flash_attention else 'false'}\n"
        # every level's clients share one key: no limit on its requests in flight
        "\n[platform]\nmax_concurrent_per_key = 0\nmax_concurrent_per_account = 0\n",
        encoding="utf-8")
    port = free_port()
    log = (workdir / "server.log").open("wb")
    command = [sys.executable, "-m", "modelyard.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--model", str(model_path), "--config", str(config)]
    env = {**os.environ, "MODELYARD_DATA_DIR": str(args.data_dir)}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        model = wait_healthy(proc, base, workdir / "server.log")
        key = re.search(r"admin key: (\S+)", (workdir / "server.log").read_text())
        if key is None:
            raise RuntimeError("modelyard serve printed no admin key")
        yield base, model, key.group(1)
    finally:
        stop_process(proc)
        log.close()


def wait_healthy(proc: subprocess.Popen[bytes], base: str, log: Path,
                 timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"modelyard exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{base}/health", timeout=2)
            if response.status_code == 200:
                return str(response.json()["models"][0])
        time.sleep(0.5)
    raise RuntimeError(f"modelyard was not healthy within {timeout_s:.0f}s (log: {log})")


async def stream_one(client: httpx.AsyncClient, base: str, model: str, prompt: str,
                     max_tokens: int) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t_first: float | None = None
    t_last = 0.0
    usage: dict[str, Any] = {}
    t_send = time.perf_counter()
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                t_last = time.perf_counter()
                t_first = t_first or t_last
            usage = chunk.get("usage") or usage
    return timing(t_send, t_first, t_last, int(usage.get("completion_tokens", 0)),
                  int(usage.get("prompt_tokens", 0)))


async def run_level(base: str, model: str, key: str, concurrency: int, prompts: list[str],
                    max_tokens: int) -> tuple[list[RequestResult], float]:
    """Send `prompts` through `concurrency` clients; return their results and the wall time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await stream_one(client, base, model, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def bench_modelyard(args: argparse.Namespace, model_path: Path
                    ) -> tuple[dict[int, Summary], dict[int, list[RequestResult]]]:
    summaries: dict[int, Summary] = {}
    raw: dict[int, list[RequestResult]] = {}
    with modelyard_server(args, model_path) as (base, model, key):
        asyncio.run(run_level(base, model, key, 1, PROMPTS[-1:], args.max_tokens))  # warm-up
        for level in args.concurrency:
            n_requests = args.requests_per_level or max(4, 2 * level)
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
            results, wall = asyncio.run(run_level(base, model, key, level, prompts,
                                                  args.max_tokens))
            raw[level], summaries[level] = results, summarize(results, wall)
            print(f"  modelyard c={level}: {summaries[level].tokens_per_s:.1f} tok/s",
                  file=sys.stderr)
    return summaries, raw


# -- baseline A: llama-cpp-python's high-level API ---------------------------------------------


def patch_use_extra_bufts() -> None:
    """Make every model load use `use_extra_bufts=False` (the default segfaults on AMX CPUs).

    `llama_cpp.llama` and `llama_cpp._internals` call `llama_model_default_params` through the
    `llama_cpp.llama_cpp` module, so replacing that attribute reaches the high-level `Llama`.
    """
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params
    if getattr(original, "_bench_patched", False):
        return

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    patched._bench_patched = True  # type: ignore[attr-defined]
    module.llama_model_default_params = patched
    llama_cpp.llama_model_default_params = patched


def bench_high_level(args: argparse.Namespace, model_path: Path
                     ) -> tuple[Summary, list[RequestResult]]:
    patch_use_extra_bufts()
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=args.context_per_sequence,
                          n_batch=args.step_token_budget, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=args.flash_attention,
                          verbose=False)
    assert llm.model_params.use_extra_bufts is False, "use_extra_bufts patch did not apply"

    def one(prompt: str) -> RequestResult:
        stream = llm.create_chat_completion(
            [{"role": "user", "content": prompt}], max_tokens=args.max_tokens, temperature=0,
            stream=True)
        t_first: float | None = None
        t_last, text, finish = 0.0, "", None
        t_send = time.perf_counter()
        for chunk in cast(Iterator[dict[str, Any]], stream):
            choice = chunk["choices"][0]
            if content := choice["delta"].get("content"):
                t_last = time.perf_counter()
                t_first = t_first or t_last
                text += content
            finish = choice.get("finish_reason") or finish
        # The stream carries no usage; a length stop is exactly max_tokens.
        tokens = args.max_tokens if finish == "length" else len(
            llm.tokenize(text.encode(), add_bos=False, special=True))
        return timing(t_send, t_first, t_last, tokens, 0)

    try:
        one(PROMPTS[-1])  # warm-up
        start = time.perf_counter()
        results = [one(PROMPTS[i % len(PROMPTS)]) for i in range(args.baseline_requests)]
        return summarize(results, time.perf_counter() - start), results
    finally:
        llm.close()


# -- baseline B: raw batched llama_decode (the ceiling) ----------------------------------------


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


def bench_ceiling(args: argparse.Namespace, model_path: Path, prompt_len: int) -> dict[int, float]:
    """tokens/s of raw batched llama_decode doing one wave's work: prefill, then decode steps."""
    llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = args.max_sequences * args.context_per_sequence  # as modelyard sizes it
    cparams.n_batch = args.step_token_budget
    cparams.n_ubatch = min(args.step_token_budget, 512)
    cparams.n_seq_max = args.max_sequences
    cparams.n_threads = cparams.n_threads_batch = args.threads
    cparams.kv_unified = False  # one KV stream per sequence, as the server
    cparams.flash_attn_type = 1 if args.flash_attention else 0
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context")
    vocab = llama_cpp.llama_model_get_vocab(model)
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(max(args.step_token_budget, prompt_len), 0, 1)
    prompt = tokenize(vocab, " ".join(PROMPTS))[:prompt_len]
    feed = tokenize(vocab, " the")[0]

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    ceiling: dict[int, float] = {}
    try:
        for size in args.concurrency:
            # The same work the server does for one wave of `size` requests: prefill the
            # prompts together (in step-budget chunks), then decode until each has
            # max_tokens tokens (the first comes from the prefill's logits).
            llama_cpp.llama_memory_clear(memory, True)
            tokens = [(t, p, seq, p == len(prompt) - 1)
                      for seq in range(size) for p, t in enumerate(prompt)]
            start = time.perf_counter()
            for first in range(0, len(tokens), args.step_token_budget):
                decode(tokens[first:first + args.step_token_budget])
            for step in range(args.max_tokens - 1):
                decode([(feed, len(prompt) + step, seq, True) for seq in range(size)])
            ceiling[size] = size * args.max_tokens / (time.perf_counter() - start)
            print(f"  ceiling B={size}: {ceiling[size]:.1f} tok/s", file=sys.stderr)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return ceiling


def tokenize(vocab: Any, text: str) -> list[int]:
    data = text.encode()
    buffer = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, len(buffer), False, False)
    return list(buffer[:n])


# -- report --------------------------------------------------------------------------------------


def verdicts(level: int, vs_high: float, vs_ceiling: float) -> str:
    checks = [(f">=0.85x ceiling {'PASS' if vs_ceiling >= 0.85 else 'MISS'}")]
    if level == 1:
        checks.insert(0, f">=0.95x HL {'PASS' if vs_high >= 0.95 else 'MISS'}")
    if level == 8:
        checks.insert(0, f">=3x HL {'PASS' if vs_high >= 3 else 'MISS'}")
    return ", ".join(checks)


def table(serving: dict[int, Summary], high: Summary, ceiling: dict[int, float]) -> str:
    """One row per level; the ceiling does the same prefill + decode work as one wave."""
    lines = ["| conc | modelyard tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | high-level tok/s "
             "| my/HL | ceiling tok/s | my/ceil | targets |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for level, s in serving.items():
        vs_high, vs_ceiling = s.tokens_per_s / high.tokens_per_s, s.tokens_per_s / ceiling[level]
        lines.append(
            f"| {level} | {s.tokens_per_s:.1f} | {s.ttft_p50_ms:.0f} / {s.ttft_p99_ms:.0f} "
            f"| {s.tpot_p50_ms:.1f} / {s.tpot_p99_ms:.1f} | {high.tokens_per_s:.1f} "
            f"| {vs_high:.2f}x | {ceiling[level]:.1f} | {vs_ceiling:.2f}x "
            f"| {verdicts(level, vs_high, vs_ceiling)} |")
    return "\n".join([*lines, f"\nhigh-level API (c=1): TTFT p50/p99 {high.ttft_p50_ms:.0f} / "
                      f"{high.ttft_p99_ms:.0f} ms, TPOT p50/p99 {high.tpot_p50_ms:.1f} / "
                      f"{high.tpot_p99_ms:.1f} ms"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels")
    p.add_argument("--requests-per-level", type=int, default=0,
                   help="requests per level (default max(4, 2*concurrency))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-flash-attention", dest="flash_attention", action="store_false",
                   help="turn flash attention off in all three (default on, as the server)")
    p.add_argument("--max-sequences", type=int, default=0,
                   help="engine.max_sequences (default: the highest concurrency)")
    p.add_argument("--context-per-sequence", type=int, default=4096)
    p.add_argument("--step-token-budget", type=int, default=512)
    p.add_argument("--baseline-requests", type=int, default=8,
                   help="requests for the high-level API baseline")
    p.add_argument("--model-path", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: concurrency 1,4; 4 requests; max_tokens 16")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests_per_level, args.max_tokens = "1,4", 4, 16
        args.baseline_requests = 4
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.max_sequences = args.max_sequences or max(args.concurrency)
    if args.max_sequences < max(args.concurrency):
        p.error("--max-sequences must be at least the highest concurrency (the ceiling needs it)")
    resolve_default_model(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()   # so the server is still stopped
    info = {**machine("llama-cpp-python"), "threads": args.threads,
            "model": str(args.model_path)}
    serving, raw = bench_modelyard(args, args.model_path)
    high, high_raw = bench_high_level(args, args.model_path)
    print(f"  high-level c=1: {high.tokens_per_s:.1f} tok/s", file=sys.stderr)
    prompt_tokens = [r.prompt_tokens for rs in raw.values() for r in rs]
    prompt_len = int(np.median(prompt_tokens)) if prompt_tokens else 32
    ceiling = bench_ceiling(args, args.model_path, min(prompt_len, args.step_token_budget))
    print(f"\nmachine: {info['cpu']} | cores {info['cores']} | threads {args.threads} | "
          f"llama-cpp-python {info['llama_cpp_python']} | max_tokens {args.max_tokens} | "
          f"load average at start {info['load_average_at_start']:.2f}\n")
    print(table(serving, high, ceiling))
    save_results("bench", {
        "machine": info,
        "modelyard": {str(k): asdict(v) for k, v in serving.items()},
        "modelyard_requests": {str(k): [asdict(r) for r in v] for k, v in raw.items()},
        "high_level": asdict(high), "high_level_requests": [asdict(r) for r in high_raw],
        "ceiling_tokens_per_s": {str(k): v for k, v in ceiling.items()},
    }, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
