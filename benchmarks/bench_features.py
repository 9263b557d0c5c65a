"""Feature benchmarks: prefix-cache TTFT, sampling cost per decode step, logprobs throughput cost.

(a) and (c) run against `modelyard serve` subprocesses (each with a fresh platform database and
an API key provisioned through `modelyard accounts create` / `modelyard keys create`); (b) runs
in-process on modelyard's LlamaRunner and Sampler. One after another, never sharing the CPU.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from _common import (
    RESULT_TABLE_HEAD,
    exit_on_sigterm,
    machine,
    resolve_default_model,
    save_results,
    stop_process,
)
from _common import result_row as row
from bench_serving import PROMPTS, free_port, wait_healthy

from modelyard.engine.runner import BatchItem, LlamaRunner, RunnerConfig
from modelyard.engine.sampling import Sampler
from modelyard.engine.sequence import SamplingParams

TOPICS = ("error handling", "naming", "tests", "concurrency", "memory use", "input validation",
          "logging")
ASPECTS = ("whether the intent is obvious to a new reader",
           "whether every failure path is handled and reported",
           "whether the behaviour matches the written specification",
           "whether a simpler construction would do the same job")
QUESTIONS = (
    "Is `x == None` fine in Python?", "Should a function both log and raise?",
    "Is a global cache a problem?", "How long may a function be?",
    "Are abbreviations in names okay?", "Should tests share fixtures?",
    "Is catching Exception ever right?", "When is a lock needed?", "Is recursion risky here?",
    "Should inputs be validated twice?", "Are print statements acceptable?",
    "Do private helpers need docstrings?", "Is a 200-line class too big?",
    "Should I pin dependency versions?", "Are magic numbers a smell?",
    "Is mutable default state a bug?")
WARMUP_SYSTEM = "Answer questions about cooking in one short paragraph."
PREFIX_TARGET, SAMPLING_TARGET, LOGPROBS_TARGET = 5.0, 0.10, 15.0


def review_system_prompt() -> str:
    """About 1,000 tokens of fixed text (the Qwen2.5 tokenizer gives 1,017)."""
    lines = ["You are a careful senior software engineer reviewing code for a small team. "
             "Answer briefly and precisely, and follow these review guidelines in order."]
    for topic in TOPICS:
        for aspect in ASPECTS:
            lines.append(f"{len(lines)}. When you look at {topic}, check {aspect}; if it is "
                         "not, say so in one sentence and suggest the smallest fix.")
    return "\n".join(lines)


# -- a server with an API key ------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    base: str
    model: str
    key: str


def provision_key(config: Path, env: dict[str, str]) -> str:
    """An account with a balance and a key on it, in the database `config` names."""
    output = ""
    for command in (["accounts", "create", "bench", "--balance", "1000"],
                    ["keys", "create", "--account", "bench", "--json"]):
        done = subprocess.run([sys.executable, "-m", "modelyard.cli", *command, "--config",
                               str(config)], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"modelyard {' '.join(command)} failed:\n{done.stdout}{done.stderr}")
        output = done.stdout
    return str(json.loads(output)["key"])


@contextlib.contextmanager
def modelyard_server(args: argparse.Namespace, prefix_caching: bool) -> Iterator[Server]:
    """`modelyard serve` with a fresh SQLite platform database in a work dir removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-features-"))
    config = workdir / "config.toml"
    config.write_text(
        f'log_level = "warning"\ndatabase_url = "sqlite:///{workdir / "platform.db"}"\n\n'
        f"[engine]\nmax_sequences = {args.max_sequences}\n"
        f"context_per_sequence = {args.context_per_sequence}\n"
        f"step_token_budget = {args.step_token_budget}\nthreads = {args.threads}\n"
        f"prefix_caching = {'true' if prefix_caching else 'false'}\n", encoding="utf-8")
    env = {**os.environ, "MODELYARD_DATA_DIR": str(args.data_dir)}
    key = provision_key(config, env)
    port = free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelyard.cli", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--model", str(args.model_path), "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        yield Server(base, wait_healthy(proc, base, log_path), key)
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# -- streaming requests ------------------------------------------------------------------------


@dataclass
class StreamResult:
    ttft_s: float
    wall_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    logprob_entries: int


async def stream_chat(client: httpx.AsyncClient, server: Server, messages: list[dict[str, str]],
                      max_tokens: int, **extra: Any) -> StreamResult:
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
    t_first: float | None = None
    usage: dict[str, Any] = {}
    entries = 0
    t_send = time.perf_counter()
    async with client.stream("POST", f"{server.base}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {server.key}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("delta", {}).get("content") and t_first is None:
                    t_first = time.perf_counter()
                entries += len((choice.get("logprobs") or {}).get("content") or [])
            usage = chunk.get("usage") or usage
    if t_first is None:
        raise RuntimeError("the response carried no content")
    details = usage.get("prompt_tokens_details") or {}
    return StreamResult(t_first - t_send, time.perf_counter() - t_send,
                        int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens", 0)),
                        int(usage.get("completion_tokens", 0)), entries)


async def run_requests(server: Server, conversations: list[list[dict[str, str]]],
                       concurrency: int, max_tokens: int,
                       **extra: Any) -> tuple[list[StreamResult], float]:
    """Send every conversation through `concurrency` clients; the results and the wall time."""
    pending = list(reversed(conversations))
    results: list[StreamResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits) as client:

        async def worker() -> None:
            while pending:
                messages = pending.pop()
                results.append(await stream_chat(client, server, messages, max_tokens, **extra))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


# -- (a) prefix cache --------------------------------------------------------------------------


def prefix_burst(args: argparse.Namespace, prefix_caching: bool) -> list[StreamResult]:
    system = review_system_prompt()
    burst = [[{"role": "system", "content": system}, {"role": "user", "content": question}]
             for question in QUESTIONS[:args.prefix_requests]]
    warmup = [[{"role": "system", "content": WARMUP_SYSTEM},
               {"role": "user", "content": "How long do I boil an egg?"}]]
    with modelyard_server(args, prefix_caching) as server:
        asyncio.run(run_requests(server, warmup, 1, args.prefix_max_tokens))
        results, _ = asyncio.run(run_requests(server, burst, len(burst), args.prefix_max_tokens))
    label = "on" if prefix_caching else "off"
    print(f"  prefix cache {label}: TTFT p50 {ms([r.ttft_s for r in results], 50):.0f} ms",
          file=sys.stderr)
    return results


def bench_prefix(args: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for label, results in (("on", prefix_burst(args, True)), ("off", prefix_burst(args, False))):
        ttfts = [r.ttft_s for r in results]
        found |= {f"ttft_{label}_p50_ms": ms(ttfts, 50), f"ttft_{label}_p99_ms": ms(ttfts, 99),
                  f"cached_tokens_{label}": sum(r.cached_tokens for r in results),
                  f"requests_{label}": [asdict(r) for r in results]}
    prompt_tokens = [r["prompt_tokens"] for r in found["requests_on"]]
    return {"requests": len(prompt_tokens), "prompt_tokens_min": min(prompt_tokens),
            "prompt_tokens_max": max(prompt_tokens), "prompt_tokens_total": sum(prompt_tokens),
            **found}


# -- (b) sampling cost -------------------------------------------------------------------------


def all_samplers_params(seed: int, n_vocab: int) -> SamplingParams:
    bias = {(1000 + 7919 * i) % n_vocab: (2.0 if i % 2 else -2.0) for i in range(10)}
    return SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
                          frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1,
                          logit_bias=bias, seed=seed)


def prefill(runner: LlamaRunner, prompts: list[list[int]]) -> list[npt.NDArray[np.float32]]:
    """Read each prompt into its slot; each one's last logits row (copied)."""
    return [np.array(runner.decode([BatchItem(slot, 0, ids, True)])[0])
            for slot, ids in enumerate(prompts)]


def sample_all(samplers: list[Sampler], logits: npt.NDArray[np.float32]
               ) -> tuple[float, list[int]]:
    """Sample every sequence's row, as the engine does; the seconds it took and the tokens."""
    start = time.perf_counter()
    tokens = [sampler.sample(logits[i]).token for i, sampler in enumerate(samplers)]
    return time.perf_counter() - start, tokens


def bench_sampling(args: argparse.Namespace) -> dict[str, Any]:
    n = args.max_sequences
    runner = LlamaRunner(RunnerConfig(
        model_path=args.model_path, n_seq_max=n, n_ctx=n * args.context_per_sequence,
        n_batch=args.step_token_budget, threads=args.threads))
    times: dict[str, list[float]] = {"decode": [], "all": [], "greedy": []}
    try:
        prompts = [runner.tokenize(PROMPTS[i % len(PROMPTS)]) for i in range(n)]
        samplers = {"all": [Sampler(all_samplers_params(i, runner.n_vocab), ids)
                            for i, ids in enumerate(prompts)],
                    "greedy": [Sampler(SamplingParams(temperature=0.0), ids) for ids in prompts]}
        tokens = [s.sample(row).token for s, row in zip(
            samplers["all"], prefill(runner, prompts), strict=True)]
        positions = [len(ids) for ids in prompts]
        for step in range(args.sampling_warmup + args.sampling_steps):
            items = [BatchItem(slot, positions[slot], [tokens[slot]], True) for slot in range(n)]
            start = time.perf_counter()
            logits = runner.decode(items)
            took = {"decode": time.perf_counter() - start}
            # Alternate which set reads the fresh logits first (cold cache lines).
            for name in ("all", "greedy") if step % 2 == 0 else ("greedy", "all"):
                took[name], sampled = sample_all(samplers[name], logits)
                tokens = sampled if name == "all" else tokens  # decode what "all" drew
            positions = [p + 1 for p in positions]
            if step >= args.sampling_warmup:
                for name, seconds in took.items():
                    times[name].append(seconds)
    finally:
        runner.close()
    p50 = {name: ms(values, 50) for name, values in times.items()}
    print(f"  sampling: decode {p50['decode']:.1f} ms, all samplers {p50['all']:.2f} ms "
          "per step", file=sys.stderr)
    return {"sequences": n, "steps": len(times["decode"]), "decode_ms_p50": p50["decode"],
            "sampling_all_ms_p50": p50["all"], "sampling_greedy_ms_p50": p50["greedy"],
            "ratio_all_to_decode": p50["all"] / p50["decode"],
            "step_ms": {name: [1000 * s for s in values] for name, values in times.items()}}


# -- (c) logprobs cost -------------------------------------------------------------------------


def bench_logprobs(args: argparse.Namespace) -> dict[str, Any]:
    conversations = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
                     for i in range(args.logprobs_requests)]
    modes: dict[str, dict[str, Any]] = {
        "plain": {}, "logprobs": {"logprobs": True, "top_logprobs": 20}}
    runs: list[dict[str, Any]] = []
    with modelyard_server(args, prefix_caching=True) as server:
        # Untimed pass: afterwards every prompt is in the prefix cache for every timed run.
        asyncio.run(run_requests(server, conversations, args.logprobs_concurrency,
                                 args.logprobs_max_tokens))
        for round_no in range(args.logprobs_rounds):
            for mode, extra in modes.items():  # A B A B: drift hits both alike
                results, wall = asyncio.run(run_requests(
                    server, conversations, args.logprobs_concurrency, args.logprobs_max_tokens,
                    **extra))
                tokens = sum(r.completion_tokens for r in results)
                runs.append({"round": round_no, "mode": mode, "tokens": tokens, "wall_s": wall,
                             "logprob_entries": sum(r.logprob_entries for r in results)})
                print(f"  logprobs round {round_no} {mode}: {tokens / wall:.1f} tok/s",
                      file=sys.stderr)
    rate = {mode: sum(r["tokens"] for r in runs if r["mode"] == mode)
            / sum(r["wall_s"] for r in runs if r["mode"] == mode) for mode in modes}
    return {"concurrency": args.logprobs_concurrency, "requests": args.logprobs_requests,
            "max_tokens": args.logprobs_max_tokens, "rounds": args.logprobs_rounds,
            "plain_tokens_per_s": rate["plain"], "logprobs_tokens_per_s": rate["logprobs"],
            "cost_percent": 100 * (1 - rate["logprobs"] / rate["plain"]), "runs": runs}


# -- report ------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    rows = list(RESULT_TABLE_HEAD)
    if p := results.get("prefix"):
        speedup = p["ttft_off_p50_ms"] / p["ttft_on_p50_ms"]
        rows += [
            row("prefix cache", "prompt tokens per request",
                f"{p['prompt_tokens_min']}-{p['prompt_tokens_max']}"),
            *(row("prefix cache", f"TTFT p50 / p99 ms, cache {label}",
                  f"{p[f'ttft_{label}_p50_ms']:.0f} / {p[f'ttft_{label}_p99_ms']:.0f}")
              for label in ("on", "off")),
            row("prefix cache", "TTFT p50 off / on", f"{speedup:.2f}x",
                f">= {PREFIX_TARGET:.0f}x", speedup >= PREFIX_TARGET),
            row("prefix cache", "prompt tokens cached, on (off)", f"{p['cached_tokens_on']} "
                f"({p['cached_tokens_off']}) of {p['prompt_tokens_total']}")]
    if s := results.get("sampling"):
        ratio = s["ratio_all_to_decode"]
        rows += [
            row("sampling", f"decode step ms, {s['sequences']} sequences (p50)",
                f"{s['decode_ms_p50']:.1f}"),
            row("sampling", "sampling ms per step, all samplers / greedy (p50)",
                f"{s['sampling_all_ms_p50']:.2f} / {s['sampling_greedy_ms_p50']:.2f}"),
            row("sampling", "all samplers / decode step", f"{100 * ratio:.1f}%",
                f"<= {100 * SAMPLING_TARGET:.0f}%", ratio <= SAMPLING_TARGET)]
    if lp := results.get("logprobs"):
        cost = lp["cost_percent"]
        rows += [
            row("logprobs", "output tok/s without / with top_logprobs=20",
                f"{lp['plain_tokens_per_s']:.1f} / {lp['logprobs_tokens_per_s']:.1f}"),
            row("logprobs", "throughput cost", f"{cost:.1f}%", f"<= {LOGPROBS_TARGET:.0f}%",
                cost <= LOGPROBS_TARGET)]
    return "\n".join(rows)


PARTS = ("prefix", "sampling", "logprobs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of "
                   f"{','.join(PARTS)} (default all)")
    p.add_argument("--max-sequences", type=int, default=16)
    p.add_argument("--context-per-sequence", type=int, default=4096)
    p.add_argument("--step-token-budget", type=int, default=512)
    p.add_argument("--model-path", type=Path)
    p.add_argument("--data-dir", type=Path, help="MODELYARD_DATA_DIR for the servers")
    p.add_argument("--quick", action="store_true", help="smoke test: small sizes")
    args = p.parse_args(argv)
    args.parts = [part for part in args.parts.split(",") if part]
    if unknown := set(args.parts) - set(PARTS):
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    sizes = dict(prefix_requests=16, prefix_max_tokens=16, sampling_steps=32, sampling_warmup=4,
                 logprobs_requests=16, logprobs_concurrency=8, logprobs_max_tokens=64,
                 logprobs_rounds=2)
    if args.quick:
        sizes.update(prefix_requests=4, prefix_max_tokens=4, sampling_steps=6, sampling_warmup=1,
                     logprobs_requests=4, logprobs_concurrency=4, logprobs_max_tokens=16,
                     logprobs_rounds=1)
    vars(args).update(sizes)
    resolve_default_model(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()   # so the servers are still stopped
    info = {**machine("llama-cpp-python"), "threads": args.threads,
            "model": str(args.model_path)}
    benches = {"prefix": bench_prefix, "logprobs": bench_logprobs, "sampling": bench_sampling}
    results = {part: bench(args) for part, bench in benches.items() if part in args.parts}
    print(f"\nmachine: {info['cpu']} | cores {info['cores']} | threads {args.threads} | "
          f"max_sequences {args.max_sequences} | load average at start "
          f"{info['load_average_at_start']:.2f}"
          f"{' | QUICK: sizes too small for the targets' if args.quick else ''}\n")
    print(table(results))
    save_results("features", {"machine": info, **results}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
