"""Text completions vs chat completions on one server: the same prompts, token for token.

One `modelyard serve` (the default model); each chat prompt is rendered and tokenized by
the server's own /tokenize (`messages`), and those token ids are the /v1/completions
prompt, so both endpoints prefill the same tokens and, greedy, generate the same answer.
At each concurrency level the two endpoints run alternately, `--rounds` times each, and
the table gives the medians of their rounds and the ratio completions / chat (tokens/s:
higher is better; TTFT and TPOT: lower is better).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from _common import machine, resolve_default_model, save_results
from bench_serving import (
    PROMPTS,
    RequestResult,
    Summary,
    modelyard_server,
    summarize,
    timing,
)

Prompt = list[int] | str


async def stream_one(client: httpx.AsyncClient, base: str, model: str, endpoint: str,
                     prompt: Prompt, max_tokens: int) -> RequestResult:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    t_first: float | None = None
    t_last = 0.0
    usage: dict[str, Any] = {}
    t_send = time.perf_counter()
    async with client.stream("POST", f"{base}{path}", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line[6:] == "[DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            choices = chunk.get("choices") or []
            text = (choices[0].get("delta", {}).get("content") if endpoint == "chat"
                    else choices[0].get("text")) if choices else None
            if text:
                t_last = time.perf_counter()
                t_first = t_first or t_last
            usage = chunk.get("usage") or usage
    return timing(t_send, t_first, t_last, int(usage.get("completion_tokens", 0)),
                  int(usage.get("prompt_tokens", 0)))


async def run_level(base: str, model: str, key: str, endpoint: str, concurrency: int,
                    prompts: list[Prompt], max_tokens: int) -> tuple[list[RequestResult], float]:
    queue: asyncio.Queue[Prompt] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600),
                                 limits=httpx.Limits(max_connections=concurrency + 4),
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await stream_one(client, base, model, endpoint, prompt,
                                                max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def rendered(base: str, model: str, key: str, prompts: list[str]) -> list[Prompt]:
    """Each prompt as the chat route renders it, in token ids (the server's /tokenize)."""
    ids: list[Prompt] = []
    for prompt in prompts:
        response = httpx.post(f"{base}/tokenize", timeout=30,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"model": model,
                                    "messages": [{"role": "user", "content": prompt}]})
        response.raise_for_status()
        ids.append(response.json()["tokens"])
    return ids


def median_summary(rounds: list[Summary]) -> dict[str, float]:
    return {name: statistics.median(getattr(s, name) for s in rounds)
            for name in ("tokens_per_s", "ttft_p50_ms", "tpot_p50_ms")}


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = ["| concurrency | chat tok/s | completions tok/s | ratio | chat TTFT p50 ms | "
             "completions TTFT p50 ms | chat TPOT p50 ms | completions TPOT p50 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for level, by in results.items():
        chat, text = by["chat"], by["completions"]
        lines.append(f"| {level} | {chat['tokens_per_s']:.1f} | {text['tokens_per_s']:.1f} | "
                     f"{text['tokens_per_s'] / chat['tokens_per_s']:.3f} | "
                     f"{chat['ttft_p50_ms']:.0f} | {text['ttft_p50_ms']:.0f} | "
                     f"{chat['tpot_p50_ms']:.1f} | {text['tpot_p50_ms']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated levels")
    p.add_argument("--requests-per-level", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="rounds of each endpoint per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--context-per-sequence", type=int, default=4096)
    p.add_argument("--step-token-budget", type=int, default=512)
    p.add_argument("--model-path", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--quick", action="store_true", help="smoke test: c=1,4; 1 round; 16 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.rounds, args.max_tokens = "1,4", 1, 16
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.max_sequences = max(args.concurrency)
    args.flash_attention = True
    resolve_default_model(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = {**machine("llama-cpp-python"), "threads": args.threads}
    results: dict[int, dict[str, dict[str, float]]] = {}
    raw: dict[str, Any] = {}
    with modelyard_server(args, args.model_path) as (base, model, key):
        by_endpoint: dict[str, list[Prompt]] = {"chat": list(PROMPTS)}
        by_endpoint["completions"] = rendered(base, model, key, PROMPTS)
        for endpoint in ("chat", "completions"):  # warm-up
            asyncio.run(run_level(base, model, key, endpoint, 1, by_endpoint[endpoint][-1:],
                                  args.max_tokens))
        for level in args.concurrency:
            n_requests = args.requests_per_level or max(4, 2 * level)
            rounds: dict[str, list[Summary]] = {"chat": [], "completions": []}
            for _ in range(args.rounds):
                for endpoint in ("chat", "completions"):
                    prompts = [by_endpoint[endpoint][i % len(PROMPTS)]
                               for i in range(n_requests)]
                    done, wall = asyncio.run(run_level(base, model, key, endpoint, level,
                                                       prompts, args.max_tokens))
                    rounds[endpoint].append(summarize(done, wall))
                    print(f"  {endpoint} c={level}: {rounds[endpoint][-1].tokens_per_s:.1f} "
                          "tok/s", file=sys.stderr)
            results[level] = {e: median_summary(s) for e, s in rounds.items()}
            raw[str(level)] = {e: [asdict(s) for s in ss] for e, ss in rounds.items()}
    print(f"\nmachine: {info['cpu']} | cores {info['cores']} | threads {args.threads} | "
          f"max_tokens {args.max_tokens} | rounds {args.rounds} | load average at start "
          f"{info['load_average_at_start']:.2f}\n")
    print(table(results))
    save_results("completions", {"machine": info, "medians": results, "rounds": raw}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
