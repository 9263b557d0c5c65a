"""KV cache in 8 bits: `[engine] kv_cache_type = "q8_0"` against the default f16.

Three measurements, one after another (each cache type's engine in a fresh process), on
the engine built as the server builds it (see bench_step_profile.py, whose code this
reuses):

1. Memory: the KV buffer llama.cpp allocates (its own log line) for the server's default
   context (16 sequences x 4,096 cells), and per cell of context, in f16 and q8_0.
2. Speed: output tokens/s and the median decode step at concurrency 1 and 8 (64 greedy
   tokens per request), with the bare `llama_decode` ceiling beside each, and how many of
   the greedy answers are word for word the f16 ones.
3. The prefix cache under a memory bound: the same KV bytes for both (f16: 8 sequences of
   512 cells; q8_0: as many cells as those bytes hold, so `context_per_sequence` 960, and
   with it the cached-cell bound of providers/local.py, 2 x context_per_sequence). N
   conversations, each with its own ~400-token document as the system prompt, are asked a
   new question each in round robin, one request at a time; reported: the share of prompt
   tokens read from the cache (`cached_tokens`) after the first round, and TTFT p50. Once
   with each conversation in a cache scope of its own (an account each, the server's
   default scoping), once with all of them in one scope.

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import llama_cpp
from _common import machine, resolve_default_model, save_results
from bench_step_profile import Variant, build, chat_prompt, profile_variant, run_wave
from bench_step_profile import table as profile_table

from modelyard.engine import runner as runner_module
from modelyard.engine.runner import LlamaRunner, RunnerConfig

KINDS = ("f16", "q8_0")
WORDS = ("river", "engine", "ledger", "copper", "window", "harvest", "signal", "garden",
         "orbit", "lantern", "canvas", "pillar", "meadow", "cipher", "anchor", "falcon",
         "thread", "marble", "valley", "beacon", "summit", "forest", "quartz", "harbor",
         "timber", "velvet", "ember", "glacier", "compass", "prism", "tunnel", "market")

_log_lines: list[str] = []


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _capture_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    _log_lines.append(text.decode("utf-8", "replace"))


# -- 1. memory ----------------------------------------------------------------------------------


def kv_memory(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The KV buffer llama.cpp reports for the default server context, per kind."""
    n_ctx = args.max_sequences * args.context_per_sequence
    LlamaRunner(RunnerConfig(args.model_path, n_seq_max=1, n_ctx=256, n_batch=32)).close()
    out: dict[str, dict[str, float]] = {}
    llama_cpp.llama_log_set(_capture_log, ctypes.c_void_p(0))
    try:
        for kind in KINDS:
            _log_lines.clear()
            runner = LlamaRunner(RunnerConfig(args.model_path, n_seq_max=args.max_sequences,
                                              n_ctx=n_ctx, n_batch=args.step_token_budget,
                                              kv_cache_type=kind))
            runner.close()
            found = re.search(r"KV buffer size\s*=\s*([\d.]+) MiB", "".join(_log_lines))
            if found is None:
                raise RuntimeError("llama.cpp logged no KV buffer size")
            mib = float(found.group(1))
            out[kind] = {"n_ctx": n_ctx, "kv_mib": mib, "bytes_per_cell": mib * 2**20 / n_ctx}
    finally:
        llama_cpp.llama_log_set(runner_module._silent_log, ctypes.c_void_p(0))
    return out


# -- 3. the prefix cache under a memory bound ---------------------------------------------------


def document(index: int, words: int) -> str:
    rng = random.Random(index)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return (f"You keep the notes of project number {index}. Answer questions about them "
            f"briefly. The notes: {body}.")


def cache_workload(args: argparse.Namespace, kind: str, context_per_sequence: int
                   ) -> dict[str, Any]:
    """Per workload and conversation count: the cached share of the prompt tokens in the
    rounds after the first, and their TTFT p50. "accounts": each conversation in a cache
    scope of its own (one account each, as the server scopes the cache by default); "one
    account": all in one scope, so their prompts share the chat template's first tokens."""
    settings = replace_args(args, max_sequences=args.cache_slots,
                            context_per_sequence=context_per_sequence)
    runner, engine = build(settings, Variant(kind, threads=2, kv_cache_type=kind))
    engine.start()
    by_n: dict[str, Any] = {}
    runs = [("accounts", n) for n in args.conversations] + [
        ("one account", n) for n in args.one_account_conversations]
    try:
        for workload, n in runs:
            engine.clear_prefix_cache()
            run_wave(engine, [chat_prompt(runner, "Hi.")], 1)  # applies the clearing
            docs = [document(1000 * n + i, args.document_words) for i in range(n)]
            later: list[tuple[int, int, float]] = []
            for round_index in range(args.rounds):
                for i, doc in enumerate(docs):
                    prompt = chat_prompt(runner, f"Question {round_index}: which word comes "
                                                 f"first in the notes?", system=doc)
                    scope = f"account-{i}" if workload == "accounts" else None
                    [answer], _ = run_wave(engine, [prompt], args.answer_tokens, scope=scope)
                    if round_index > 0:
                        later.append((answer.cached, answer.prompt,
                                      answer.first_at - answer.sent_at))
            cached, prompt_tokens = sum(c for c, _, _ in later), sum(p for _, p, _ in later)
            by_n[f"{workload}/{n}"] = {"cached_share": cached / prompt_tokens,
                            "prompt_tokens": prompt_tokens / len(later),
                            "ttft_p50_ms": statistics.median(t for _, _, t in later) * 1000}
            print(f"  {kind} {workload} N={n}: {100 * cached / prompt_tokens:.1f}% cached",
                  file=sys.stderr)
    finally:
        engine.stop()
        runner.close()
    return by_n


def replace_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


# -- report -------------------------------------------------------------------------------------


def report(memory: dict[str, Any], speed: dict[str, Any], cache: dict[str, Any],
           args: argparse.Namespace) -> str:
    lines = [f"KV cache of the default server context ({args.max_sequences} x "
             f"{args.context_per_sequence} = {memory['f16']['n_ctx']} cells):\n",
             "| kv_cache_type | KV buffer MiB | bytes per cell (token of context) |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {m['kv_mib']:.1f} | {m['bytes_per_cell']:.0f} |"
              for k, m in memory.items()]
    lines += ["", "| conc | f16 tok/s | q8_0 tok/s | q8_0 / f16 | f16 step ms | q8_0 step ms "
              "| f16 ceiling ms | q8_0 ceiling ms | greedy answers equal to f16's |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for level in (str(c) for c in args.concurrency):
        f, q = speed["f16"][level], speed["q8_0"][level]
        same = sum(a == b for a, b in zip(f["texts"], q["texts"], strict=True))
        lines.append(f"| {level} | {f['tokens_per_s']:.1f} | {q['tokens_per_s']:.1f} "
                     f"| {q['tokens_per_s'] / f['tokens_per_s']:.2f}x | {f['step']:.1f} "
                     f"| {q['step']:.1f} | {f['ceiling']:.1f} | {q['ceiling']:.1f} "
                     f"| {same} of {len(f['texts'])} |")
    f_cps, q_cps = cache["context_per_sequence"]["f16"], cache["context_per_sequence"]["q8_0"]
    lines += ["", f"Prefix cache at the same KV memory ({args.cache_slots} slots; f16 "
              f"context_per_sequence {f_cps}, q8_0 {q_cps}; cached-cell bound "
              f"{2 * f_cps} / {2 * q_cps}), rounds after the first:\n",
              "| conversations | prompt tokens | f16 cached | q8_0 cached | f16 TTFT p50 ms "
              "| q8_0 TTFT p50 ms |", "|---|---:|---:|---:|---:|---:|"]
    for key in cache["f16"]:
        f, q = cache["f16"][key], cache["q8_0"][key]
        workload, n = key.split("/")
        lines.append(f"| {n}, {workload} | {f['prompt_tokens']:.0f} "
                     f"| {100 * f['cached_share']:.1f}% "
                     f"| {100 * q['cached_share']:.1f}% | {f['ttft_p50_ms']:.0f} "
                     f"| {q['ttft_p50_ms']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-sequences", type=int, default=16)
    p.add_argument("--context-per-sequence", type=int, default=4096)
    p.add_argument("--step-token-budget", type=int, default=512)
    p.add_argument("--cache-slots", type=int, default=8)
    p.add_argument("--cache-context", type=int, default=512,
                   help="f16 context_per_sequence of the cache workload")
    p.add_argument("--conversations", default="2,4,6",
                   help="conversation counts, each conversation its own account")
    p.add_argument("--one-account-conversations", default="4",
                   help="conversation counts, all in one account (one cache scope)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--document-words", type=int, default=330)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--child-context", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-path", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 16 tokens, concurrency 1,4, 2 rounds of 2 and 4")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens, args.conversations, args.rounds = "1,4", 16, "2,4", 2
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.conversations = [int(c) for c in str(args.conversations).split(",") if c]
    args.one_account_conversations = [
        int(c) for c in str(args.one_account_conversations).split(",") if c]
    args.grammar_levels, args.greedy_rounds = [], 0  # what profile_variant reads
    resolve_default_model(args)
    return args


def run_kind(args: argparse.Namespace, kind: str, context_per_sequence: int
             ) -> dict[str, Any]:
    """One cache type's speed and prefix-cache runs in a fresh process: llama.cpp decodes
    measurably slower on a thread other than the first one that decoded in the process,
    so each engine gets a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kind.json"
        command = [sys.executable, __file__, "--child", kind, "--child-context",
                   str(context_per_sequence), "--child-out", str(out),
                   "--model-path", str(args.model_path), "--data-dir", str(args.data_dir)]
        for name in ("concurrency", "conversations", "one_account_conversations"):
            command += [f"--{name.replace('_', '-')}", ",".join(map(str, getattr(args, name)))]
        for name in ("max_tokens", "max_sequences", "context_per_sequence",
                     "step_token_budget", "cache_slots", "rounds", "document_words",
                     "answer_tokens"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        subprocess.run(command, check=True)
        result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = {"speed": profile_variant(args, Variant(args.child, 2,
                                                         kv_cache_type=args.child)),
                  "cache": cache_workload(args, args.child, args.child_context)}
        args.child_out.write_text(json.dumps(result), encoding="utf-8")
        return 0
    info = {**machine("llama-cpp-python"), "model": str(args.model_path)}
    memory = kv_memory(args)
    ratio = memory["f16"]["bytes_per_cell"] / memory["q8_0"]["bytes_per_cell"]
    contexts = {"f16": args.cache_context,
                "q8_0": int(args.cache_context * ratio) // 64 * 64}
    runs = {kind: run_kind(args, kind, contexts[kind]) for kind in KINDS}
    speed = {kind: run["speed"] for kind, run in runs.items()}
    cache: dict[str, Any] = {"context_per_sequence": contexts,
                             **{kind: run["cache"] for kind, run in runs.items()}}
    print(f"\nmachine: {info['cpu']} | cores {info['cores']} | llama-cpp-python "
          f"{info['llama_cpp_python']} | 2 threads | load average at start "
          f"{info['load_average_at_start']:.2f}\n")
    print(report(memory, speed, cache, args))
    print("\nthe decode steps, f16 and q8_0:\n")
    print(profile_table(speed))
    save_results("kv-cache", {"machine": info, "memory": memory, "speed": speed,
                              "cache": cache}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
