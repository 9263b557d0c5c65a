"""Where a decode step's time goes: the engine in process, timed from outside.

The runner and the Engine are built as the server builds them (providers/local.py), and
the benchmark wraps their methods with perf_counter timers (nothing in src is changed):
`llama_decode` itself, the rest of `LlamaRunner.decode` (filling the batch, the logits
view), sampling (`Sampler.sample`), grammar masks (`GrammarMatcher`), detokenizing, stop
strings, handing outputs to the event loop (`_send`), the scheduler (`schedule` and
`update_from_output`), and the rest of `Engine.step` (metrics, bookkeeping). Per level
(1, 8 and 16 requests of 64 greedy tokens each, submitted together) it reports the median
of each over the steps that decode exactly one token of every sequence, beside the
ceiling: the same runner's bare `llama_decode` of as many sequences, each holding the same
prompt, at the same positions, with no engine around it. Variants: flash attention on and
off, 2 threads and 1, a json_schema constraint on every request; each variant runs in a
fresh process, one after another. The last table times
greedy sampling on real logits row by row (as `Engine._sample` does now) against one
vectorised argmax over the `[B, vocab]` logits (`sampling.greedy_tokens`).

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from _common import machine, resolve_default_model, save_results
from bench_serving import PROMPTS

from modelyard.engine import engine as engine_module
from modelyard.engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from modelyard.engine.engine import Engine
from modelyard.engine.grammar import Constraint, GrammarCompiler, GrammarMatcher
from modelyard.engine.runner import BatchItem, LlamaRunner, RunnerConfig
from modelyard.engine.sampling import Sampler, greedy_tokens
from modelyard.engine.scheduler import SchedulerConfig
from modelyard.engine.sequence import SamplingParams

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                           "story": {"type": "string"}},
          "required": ["title", "story"]}
PARTS = ("llama_decode", "batch_logits", "sampling", "grammar", "detokenize", "stops",
         "deliver", "scheduler")
"""The timed parts of a step; `rest` is the step less all of them."""


@dataclass(frozen=True)
class Variant:
    name: str
    threads: int
    flash_attention: bool = True
    kv_cache_type: str = "f16"
    grammar: bool = False


@dataclass
class Step:
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    total: float = 0.0
    items: int = 0
    tokens: int = 0


# -- building the engine as the server does -----------------------------------------------------


def build(args: argparse.Namespace, variant: Variant) -> tuple[LlamaRunner, Engine]:
    """providers/local.py's runner and Engine for these settings (same formulas)."""
    n_ctx = args.max_sequences * args.context_per_sequence
    runner = LlamaRunner(RunnerConfig(
        model_path=args.model_path, n_seq_max=args.max_sequences, n_ctx=n_ctx,
        n_batch=args.step_token_budget, threads=variant.threads,
        flash_attention=variant.flash_attention, kv_cache_type=variant.kv_cache_type))
    grammar = GrammarCompiler(runner.grammar_tokenizer(), runner.n_vocab)
    engine = Engine(runner, SchedulerConfig(
        max_sequences=args.max_sequences, step_token_budget=args.step_token_budget,
        kv_capacity=n_ctx, context_per_sequence=args.context_per_sequence, max_waiting=256,
        max_cached_cells=2 * args.context_per_sequence), None, grammar)
    return runner, engine


def chat_prompt(runner: LlamaRunner, user: str, system: str = SYSTEM) -> list[int]:
    return runner.tokenize(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
                           f"{user}<|im_end|>\n<|im_start|>assistant\n")


@dataclass
class Answer:
    text: str = ""
    tokens: int = 0
    cached: int = 0
    prompt: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    sent_at: float = 0.0


def run_wave(engine: Engine, prompts: list[list[int]], max_tokens: int,
             constraint: Constraint | None = None, tag: str = "r",
             scope: str | None = None) -> tuple[list[Answer], float]:
    """Submit every prompt at once (greedy, `max_tokens`, prefix-cache scope `scope`); the
    answers and the wall time."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    async def one(index: int, prompt: list[int]) -> Answer:
        answer = Answer(sent_at=time.perf_counter())
        queue = engine.submit(f"{tag}-{index}-{time.monotonic_ns()}", prompt, params,
                              constraint=constraint, cache_scope=scope)
        while True:
            output = await queue.get()
            if output.error is not None:
                raise RuntimeError(output.error)
            now = time.perf_counter()
            answer.first_at = answer.first_at or now
            answer.last_at = now
            answer.text += output.text
            answer.tokens, answer.cached = output.num_output_tokens, output.num_cached_tokens
            answer.prompt = output.num_prompt_tokens
            if output.finish_reason is not None:
                return answer

    async def main() -> list[Answer]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    start = time.perf_counter()
    answers = asyncio.run(main())
    return answers, time.perf_counter() - start


# -- timing from outside ------------------------------------------------------------------------


class Profiler:
    """Wraps the engine's methods with timers; each wrapped call adds its time to the
    current step's part. Undone by `close`."""

    def __init__(self, runner: LlamaRunner, engine: Engine) -> None:
        self.steps: list[Step] = []
        self.current: Step | None = None
        self._undo: list[tuple[Any, str, Any, bool]] = []
        self._timed(llama_cpp, "llama_decode", "llama_decode")
        self._timed(runner, "decode", "batch_logits", items=True)
        self._timed(Sampler, "sample", "sampling")
        for name in ("allowed", "consume", "prefetch"):
            self._timed(GrammarMatcher, name, "grammar")
        for name in ("add", "flush"):
            self._timed(IncrementalDetokenizer, name, "detokenize")
        for name in ("feed", "flush"):
            self._timed(StopStringMatcher, name, "stops")
        self._timed(engine_module, "_send", "deliver")
        self._timed(engine.scheduler, "schedule", "scheduler")
        self._timed(engine.scheduler, "update_from_output", "scheduler")
        original = engine.step

        def step() -> None:
            record = self.current = Step()
            started = time.perf_counter()
            try:
                original()
            finally:
                record.total = time.perf_counter() - started
                self.current = None
                self.steps.append(record)

        self._patch(engine, "step", step)

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        own = name in vars(owner)
        self._undo.append((owner, name, vars(owner).get(name), own))
        setattr(owner, name, value)

    def _timed(self, owner: Any, name: str, part: str, *, items: bool = False) -> None:
        original: Callable[..., Any] = getattr(owner, name)
        profiler = self

        def timed(*call_args: Any, **kwargs: Any) -> Any:
            record = profiler.current
            started = time.perf_counter()
            try:
                return original(*call_args, **kwargs)
            finally:
                if record is not None:
                    record.parts[part] += time.perf_counter() - started
                    if items:
                        batch = call_args[0]
                        record.items = len(batch)
                        record.tokens = sum(len(item.tokens) for item in batch)

        # On a class, `timed` is a plain function too: called with `self` first.
        self._patch(owner, name, timed)

    def close(self) -> None:
        for owner, name, value, own in reversed(self._undo):
            if own:
                setattr(owner, name, value)
            else:
                delattr(owner, name)
        self._undo.clear()

    def decode_steps(self, batch: int) -> list[Step]:
        """The steps that decoded one token of each of `batch` sequences."""
        return [s for s in self.steps if s.items == batch and s.tokens == batch]


def breakdown(steps: list[Step]) -> dict[str, float]:
    """Median ms of each part over `steps` (batch_logits less the llama_decode inside it)."""
    def med(values: list[float]) -> float:
        return statistics.median(values) * 1000 if values else float("nan")

    out = {part: med([s.parts[part] for s in steps]) for part in PARTS}
    out["batch_logits"] = med([s.parts["batch_logits"] - s.parts["llama_decode"] for s in steps])
    out["rest"] = med([s.total - sum(s.parts[p] for p in PARTS if p != "llama_decode")
                       for s in steps])
    out["step"] = med([s.total for s in steps])
    out["steps"] = len(steps)
    return out


# -- the ceiling: the same runner, nothing around llama_decode ---------------------------------


def prefill(runner: LlamaRunner, prompts: list[list[int]]) -> None:
    """An empty cache, then each prompt in its own slot (0..B-1), no logits, a step budget
    at a time (no prompt is longer than one)."""
    runner.clear_all()
    chunk: list[BatchItem] = []
    for slot, ids in enumerate(prompts):
        if sum(len(i.tokens) for i in chunk) + len(ids) > runner.config.n_batch:
            runner.decode(chunk)
            chunk = []
        chunk.append(BatchItem(slot, 0, ids, False))
    runner.decode(chunk)


def ceiling(runner: LlamaRunner, prompts: list[list[int]], steps: int) -> float:
    """Median ms of a bare `llama_decode` (through `LlamaRunner.decode`) of one token for
    each of the prompts' sequences, each holding its own prompt, at the positions the
    engine decodes."""
    prefill(runner, prompts)
    feed = runner.tokenize(" the", add_special=False)[0]
    times = []
    for step in range(steps):
        batch = [BatchItem(slot, len(ids) + step, [feed], True)
                 for slot, ids in enumerate(prompts)]
        started = time.perf_counter()
        runner.decode(batch)
        times.append(time.perf_counter() - started)
    runner.clear_all()
    return statistics.median(times) * 1000


# -- greedy sampling: row by row against one argmax ---------------------------------------------


def greedy_compare(runner: LlamaRunner, prompts: list[list[int]], rounds: int
                   ) -> dict[str, float]:
    """Median ms per step to pick the greedy token of B rows of real logits: B calls of
    `Sampler.sample` (what `Engine._sample` does for a plain greedy request) against one
    `greedy_tokens` call; both read the same fresh logits, alternating which goes first."""
    prefill(runner, prompts)
    samplers = [Sampler(SamplingParams(temperature=0.0), ids) for ids in prompts]
    feed = runner.tokenize(" the", add_special=False)[0]
    logits = runner.decode([BatchItem(slot, len(ids), [feed], True)
                            for slot, ids in enumerate(prompts)])
    rows, batched = [], []
    positions = [len(ids) + 1 for ids in prompts]
    for step in range(rounds):
        order = ("rows", "batched") if step % 2 == 0 else ("batched", "rows")
        picked: dict[str, list[int]] = {}
        took: dict[str, float] = {}
        for name in order:
            started = time.perf_counter()
            if name == "rows":
                picked[name] = [s.sample(logits[i]).token for i, s in enumerate(samplers)]
            else:
                picked[name] = greedy_tokens(logits).tolist()
            took[name] = time.perf_counter() - started
        if picked["rows"] != picked["batched"]:
            raise AssertionError("the vectorised argmax picked other tokens")
        rows.append(took["rows"])
        batched.append(took["batched"])
        logits = runner.decode([BatchItem(slot, positions[slot], [picked["rows"][slot]], True)
                                for slot in range(len(prompts))])
        positions = [p + 1 for p in positions]
    runner.clear_all()
    return {"rows_ms": statistics.median(rows) * 1000,
            "batched_ms": statistics.median(batched) * 1000}


# -- one variant --------------------------------------------------------------------------------


def profile_variant(args: argparse.Namespace, variant: Variant) -> dict[str, Any]:
    runner, engine = build(args, variant)
    profiler = Profiler(runner, engine)
    levels: dict[str, Any] = {}
    engine.start()
    try:
        constraint = (engine.grammar.json_schema(SCHEMA, strict=False)
                      if variant.grammar and engine.grammar is not None else None)
        suffix = (" Answer as JSON with the keys title and story." if constraint else "")
        run_wave(engine, [chat_prompt(runner, PROMPTS[-1] + suffix)], 8, constraint)  # warm-up
        for level in (args.grammar_levels if variant.grammar else args.concurrency):
            prompts = [chat_prompt(runner, PROMPTS[i % len(PROMPTS)] + suffix)
                       for i in range(level)]
            engine.clear_prefix_cache()
            run_wave(engine, [chat_prompt(runner, "Hi.")], 1)  # applies the clearing
            profiler.steps.clear()
            answers, wall = run_wave(engine, prompts, args.max_tokens, constraint)
            steps = profiler.decode_steps(level)
            levels[str(level)] = {**breakdown(steps),
                                  "tokens_per_s": sum(a.tokens for a in answers) / wall,
                                  "prompt_tokens": statistics.median(len(p) for p in prompts),
                                  "texts": [a.text for a in answers]}
            print(f"  {variant.name} c={level}: step {levels[str(level)]['step']:.1f} ms, "
                  f"{len(steps)} decode steps", file=sys.stderr)
    finally:
        engine.stop()
        profiler.close()
    try:
        if not variant.grammar:
            for level in args.concurrency:
                prompts = [chat_prompt(runner, PROMPTS[i % len(PROMPTS)]) for i in range(level)]
                levels[str(level)]["ceiling"] = ceiling(runner, prompts, args.max_tokens - 1)
        if variant == VARIANTS[0] and args.greedy_rounds:
            for level in args.concurrency:
                prompts = [chat_prompt(runner, PROMPTS[i % len(PROMPTS)]) for i in range(level)]
                levels[str(level)]["greedy"] = greedy_compare(runner, prompts,
                                                              args.greedy_rounds)
    finally:
        runner.close()
    return levels


VARIANTS = (Variant("flash attention on, 2 threads", 2),
            Variant("flash attention off, 2 threads", 2, flash_attention=False),
            Variant("flash attention on, 1 thread", 1),
            Variant("json_schema, flash attention on, 2 threads", 2, grammar=True))


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ["| variant | conc | step ms | llama_decode | batch + logits view | sampling "
            "| grammar | detokenize | stops | deliver | scheduler | rest | outside decode "
            "| ceiling ms | step / ceiling | tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, levels in results.items():
        for level, r in levels.items():
            outside = r["step"] - r["llama_decode"]
            ceil = r.get("ceiling")
            ratio = f"{r['step'] / ceil:.2f}x" if ceil else ""
            cells = " | ".join(f"{r[p]:.2f}" for p in (*PARTS, "rest"))
            head.append(f"| {name} | {level} | {r['step']:.1f} | {cells} "
                        f"| {outside:.2f} ({100 * outside / r['step']:.1f}%) "
                        f"| {f'{ceil:.1f}' if ceil else ''} | {ratio} "
                        f"| {r['tokens_per_s']:.1f} |")
    return "\n".join(head)


def greedy_table(levels: dict[str, Any]) -> str:
    lines = ["| conc | Sampler.sample per row, ms/step | greedy_tokens over [B, vocab], ms/step "
             "| saved per step |", "|---:|---:|---:|---:|"]
    for level, r in levels.items():
        if "greedy" in r:
            g = r["greedy"]
            lines.append(f"| {level} | {g['rows_ms']:.3f} | {g['batched_ms']:.3f} "
                         f"| {g['rows_ms'] - g['batched_ms']:.3f} ms "
                         f"({100 * (g['rows_ms'] - g['batched_ms']) / r['step']:.2f}% of the "
                         f"step) |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", default="1,8,16")
    p.add_argument("--grammar-levels", default="8", help="levels of the json_schema run")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-sequences", type=int, default=16)
    p.add_argument("--context-per-sequence", type=int, default=4096)
    p.add_argument("--step-token-budget", type=int, default=512)
    p.add_argument("--greedy-rounds", type=int, default=40)
    p.add_argument("--variants", default="0,1,2,3",
                   help="which variants, by index: " + "; ".join(
                       f"{i} {v.name}" for i, v in enumerate(VARIANTS)))
    p.add_argument("--model-path", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--variant-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: concurrency 1,4, 16 tokens, two variants")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.grammar_levels, args.max_tokens = "1,4", "4", 16
        args.variants, args.greedy_rounds = "0,3", 5
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.grammar_levels = [int(c) for c in str(args.grammar_levels).split(",")]
    args.variants = [int(v) for v in str(args.variants).split(",")]
    if max(args.concurrency + args.grammar_levels) > args.max_sequences:
        p.error("--max-sequences must be at least the highest concurrency")
    resolve_default_model(args)
    return args


def run_in_child(args: argparse.Namespace, index: int) -> dict[str, Any]:
    """One variant in a fresh process (nothing of the last variant's llama.cpp state
    stays); its levels, or {} with a message when the child failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "variant.json"
        command = [sys.executable, __file__, "--variants", str(index), "--variant-out",
                   str(out), "--model-path", str(args.model_path),
                   "--data-dir", str(args.data_dir)]
        for name in ("concurrency", "grammar_levels"):
            command += [f"--{name.replace('_', '-')}", ",".join(map(str, getattr(args, name)))]
        for name in ("max_tokens", "max_sequences", "context_per_sequence",
                     "step_token_budget", "greedy_rounds"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        code = subprocess.run(command, check=False).returncode
        if code != 0 or not out.exists():
            print(f"  {VARIANTS[index].name}: the child exited with {code}", file=sys.stderr)
            return {}
        levels: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return levels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant_out is not None:
        [index] = args.variants
        levels = profile_variant(args, VARIANTS[index])
        args.variant_out.write_text(json.dumps(levels), encoding="utf-8")
        return 0
    info = {**machine("llama-cpp-python", "llguidance"), "model": str(args.model_path)}
    results = {VARIANTS[i].name: run_in_child(args, i) for i in args.variants}
    print(f"\nmachine: {info['cpu']} | cores {info['cores']} | llama-cpp-python "
          f"{info['llama_cpp_python']} | max_tokens {args.max_tokens} | load average at start "
          f"{info['load_average_at_start']:.2f} | pid {os.getpid()}\n")
    print("median ms per decode step (steps that decode one token of every sequence):\n")
    print(table(results))
    first = results.get(VARIANTS[0].name)
    if first and args.greedy_rounds:
        print("\ngreedy sampling on real logits (flash attention on, 2 threads):\n")
        print(greedy_table(first))
    save_results("step-profile", {"machine": info, "results": results}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
