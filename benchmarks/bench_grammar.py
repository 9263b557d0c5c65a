"""Constrained decoding: per-token mask time of llguidance (what modelyard uses), xgrammar and
llama.cpp's GBNF sampler, and the throughput cost of `response_format: json_schema`.

(a) In-process, on the model's vocabulary only: for each of three JSON schemas one valid
document is tokenized with the model's tokenizer; each library computes the allowed-token mask
at every position of that same sequence (timed), then advances by its token. (b) Against a
`modelyard serve` subprocess: concurrent streaming requests with and without the nested schema
as `response_format`, alternated. xgrammar is optional (not a modelyard dependency); (a) runs
without modelyard given --model-path. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import llama_cpp
import llguidance
import llguidance.llamacpp
import llguidance.numpy as llg_numpy
import numpy as np
import numpy.typing as npt
from _common import RESULT_TABLE_HEAD, exit_on_sigterm, machine, resolve_default_model, save_results
from _common import result_row as row
from llama_cpp.llama_grammar import json_schema_to_gbnf

MASK_TARGET_MS, THROUGHPUT_TARGET = 1.0, 0.8
SEPARATORS = (",", ":")  # the documents' JSON layout; modelyard's grammars allow exactly this

# -- schemas and one valid document for each -----------------------------------------------


def obj(optional: tuple[str, ...] = (), **props: Any) -> dict[str, Any]:
    """An object of `props`, all required but `optional` (which come last: llama.cpp's
    converter puts required properties first)."""
    return {"type": "object", "properties": props,
            "required": [name for name in props if name not in optional],
            "additionalProperties": False}


def string(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "string", "minLength": lo, "maxLength": hi}


def integer(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def array(items: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


def enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


STR, NUM, BOOL = {"type": "string"}, {"type": "number"}, {"type": "boolean"}
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD")

FLAT = obj(name=STR, age={"type": "integer"}, score=NUM, active=BOOL)
FLAT_DOC = {"name": "Ada Lovelace", "age": 36, "score": 97.5, "active": True}

NESTED = obj(
    ("rating",),
    title=string(10, 80),
    author=obj(name=string(3, 40), address=obj(
        city=string(2, 40), country=enum("Brazil", "Canada", "France", "Japan", "Portugal"))),
    genre=enum("fantasy", "science fiction", "mystery", "romance", "horror"),
    chapters=array(obj(number=integer(1, 99), title=string(10, 60), pages=integer(1, 500)), 3, 6),
    tags=array(string(2, 20), 1, 5),
    rating={"type": "number", "minimum": 0, "maximum": 5})
NESTED_DOC = {
    "title": "The Lighthouse at the Edge of the Map",
    "author": {"name": "Mara Okafor", "address": {"city": "Lisbon", "country": "Portugal"}},
    "genre": "mystery",
    "chapters": [{"number": 1, "title": "A Letter Without a Stamp", "pages": 18},
                 {"number": 2, "title": "The Keeper's Logbook", "pages": 24},
                 {"number": 3, "title": "Fog Over the Northern Reef", "pages": 31}],
    "tags": ["lighthouse", "coastal", "slow burn"], "rating": 4.5}

FUNCTIONS: dict[str, dict[str, Any]] = {
    "get_weather": obj(location=string(1, 100), unit=enum("celsius", "fahrenheit")),
    "search_web": obj(query=STR, max_results=integer(1, 20)),
    "send_email": obj(to=array(STR, 1, 10), subject=string(1, 120), body=STR),
    "create_event": obj(("attendees",), title=STR, start=STR,
                        duration_minutes=integer(5, 480), attendees=array(STR, 0, 20)),
    "convert_currency": obj(amount=NUM, source=enum(*CURRENCIES), target=enum(*CURRENCIES)),
    "translate": obj(text=STR, target_language=enum("en", "fr", "de", "es", "ja", "zh")),
    "set_reminder": obj(message=STR, minutes=integer(1, 10080)),
    "get_stock_price": obj(symbol={"type": "string", "pattern": "^[A-Z]{1,5}$"}),
    "book_flight": obj(origin=string(3, 3), destination=string(3, 3), date=STR,
                       passengers=integer(1, 9), cabin=enum("economy", "business", "first")),
    "calculate": obj(expression=STR),
    "read_file": obj(("max_bytes",), path=STR, max_bytes=integer(1, 1 << 20)),
    "run_sql": obj(("params",), query=STR, params=array(STR, 0, 16)),
    "create_issue": obj(repository=STR, title=string(5, 200), labels=array(STR, 0, 10),
                        priority=enum("low", "medium", "high", "urgent")),
    "resize_image": obj(url=STR, width=integer(1, 8192), height=integer(1, 8192),
                        keep_aspect=BOOL),
    "play_music": obj(("artist", "song"), shuffle=BOOL, artist=STR, song=STR),
    "order_food": obj(restaurant=STR, delivery=BOOL, items=array(
        obj(("notes",), name=STR, quantity=integer(1, 20), notes=STR), 1, 10)),
}
TOOLS = {"anyOf": [obj(name={"const": name}, arguments=params)  # as modelyard builds calls
                   for name, params in FUNCTIONS.items()]}
TOOLS_DOC = {"name": "order_food", "arguments": {
    "restaurant": "Luigi's Trattoria", "delivery": True,
    "items": [{"name": "margherita pizza", "quantity": 2},
              {"name": "tiramisu", "quantity": 1, "notes": "extra cocoa"}]}}

SCHEMAS = {"flat": (FLAT, FLAT_DOC), "nested": (NESTED, NESTED_DOC), "tools": (TOOLS, TOOLS_DOC)}

# -- the vocabulary ----------------------------------------------------------------------------


def _log_errors_only(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == 4:
        sys.stderr.write(text.decode("utf-8", "replace"))


_quiet_log = llama_cpp.llama_log_callback(_log_errors_only)


class Vocab:
    """The model's vocabulary, loaded as modelyard loads models (use_extra_bufts off)."""

    def __init__(self, model_path: Path) -> None:
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        self.eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False,
                                     True)
        return list(buffer[:n])

    def pieces(self) -> list[bytes]:
        """Every token's bytes; special tokens give b'' (xgrammar treats those as special)."""
        buffer = ctypes.create_string_buffer(256)
        out = []
        for token in range(self.n_vocab):
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 256, 0, False)
            out.append(buffer.raw[:max(n, 0)])
        return out


# -- the three engines, behind one interface -----------------------------------------------------


def timed(call: Callable[[], Any]) -> tuple[float, float]:
    """Run `call` (one mask computation); the seconds it took, by the wall clock and in this
    thread's CPU time (every engine computes masks on the calling thread). The CPU time leaves
    out the time the thread was preempted: on a busy machine only it stays meaningful."""
    cpu, wall = time.thread_time(), time.perf_counter()
    call()
    return time.perf_counter() - wall, time.thread_time() - cpu


class BitmaskDriver:
    """llguidance and xgrammar: the mask is a bitmask of 32-bit words (token t is bit t % 32 of
    word t // 32), filled in place by `fill`; `consume` advances the matcher."""

    def __init__(self, fill: Callable[[npt.NDArray[np.int32]], Any],
                 consume: Callable[[int], Any], bitmask: npt.NDArray[np.int32]) -> None:
        self.fill, self.consume, self.bitmask = fill, consume, bitmask

    def mask(self) -> tuple[float, float]:
        return timed(partial(self.fill, self.bitmask))

    def allows(self, token: int) -> bool:
        return bool((int(self.bitmask[0, token >> 5]) >> (token & 31)) & 1)

    def advance(self, token: int) -> None:
        self.consume(token)

    def close(self) -> None:
        pass


class GBNFDriver:
    """llama.cpp's grammar sampler over a full-vocabulary candidate array (it sets the logit
    of every token the grammar rejects to -inf)."""

    def __init__(self, sampler: Any, n_vocab: int) -> None:
        self.sampler = sampler
        self.data = (llama_cpp.llama_token_data * n_vocab)()
        self.view = np.ctypeslib.as_array(self.data)  # fields id, logit, p
        self.candidates = llama_cpp.llama_token_data_array(
            data=self.data, size=n_vocab, selected=-1, sorted=False)

    def mask(self) -> tuple[float, float]:
        self.view["id"] = np.arange(len(self.view))
        self.view["logit"] = 0.0
        self.candidates.size, self.candidates.selected = len(self.view), -1
        return timed(partial(llama_cpp.llama_sampler_apply, self.sampler,
                             ctypes.byref(self.candidates)))

    def allows(self, token: int) -> bool:
        return bool(np.isfinite(self.view["logit"][token]))

    def advance(self, token: int) -> None:  # only after allows(): llama.cpp aborts otherwise
        llama_cpp.llama_sampler_accept(self.sampler, token)

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)


Driver = BitmaskDriver | GBNFDriver
Compiler = Callable[[dict[str, Any]], Driver]


def llguidance_compiler(vocab: Vocab, threads: int) -> Compiler:
    tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab.vocab)

    def compile_schema(schema: dict[str, Any]) -> Driver:  # as modelyard's strict json_schema
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"lenient": False, "whitespace_flexible": False})
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return BitmaskDriver(partial(llg_numpy.fill_next_token_bitmask, matcher),
                             matcher.consume_token,
                             llg_numpy.allocate_token_bitmask(1, tokenizer.vocab_size))
    return compile_schema


def xgrammar_compiler(vocab: Vocab, threads: int) -> Compiler:
    import xgrammar as xgr  # optional: not a modelyard dependency

    # RAW: the vocabulary holds each token's bytes as they are (llama.cpp's pieces).
    info = xgr.TokenizerInfo(vocab.pieces(), xgr.VocabType.RAW, vocab_size=vocab.n_vocab,
                             stop_token_ids=vocab.eog)
    compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)

    def compile_schema(schema: dict[str, Any]) -> Driver:
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                separators=SEPARATORS, strict_mode=True)
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = np.zeros(xgr.get_bitmask_shape(1, vocab.n_vocab), dtype=np.int32)  # DLPack
        return BitmaskDriver(matcher.fill_next_token_bitmask, matcher.accept_token, bitmask)
    return compile_schema


def gbnf_compiler(vocab: Vocab, threads: int) -> Compiler:
    def compile_schema(schema: dict[str, Any]) -> Driver:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
        sampler = llama_cpp.llama_sampler_init_grammar(vocab.vocab, gbnf.encode(), b"root")
        if not sampler:
            raise RuntimeError("llama.cpp rejected the converted grammar")
        return GBNFDriver(sampler, vocab.n_vocab)
    return compile_schema


LIBRARIES = {"llguidance": llguidance_compiler, "xgrammar": xgrammar_compiler,
             "llama.cpp GBNF": gbnf_compiler}

# -- (a) mask time -----------------------------------------------------------------------------


@dataclass
class MaskStats:
    compile_ms: list[float] = field(default_factory=list)
    mask_ms: list[float] = field(default_factory=list)
    mask_cpu_ms: list[float] = field(default_factory=list)
    rejected_at: int | None = None
    error: str | None = None


def drive(driver: Driver, tokens: list[int], eos: int
          ) -> tuple[list[tuple[float, float]], int | None]:
    """Mask at every position of `tokens` and then for the end of sequence; the (wall, CPU)
    seconds each took, and where the engine rejected the sequence (None: it accepted it all)."""
    times = []
    for i, token in enumerate([*tokens, eos]):
        times.append(driver.mask())
        if not driver.allows(token):
            return times, i
        if i < len(tokens):
            driver.advance(token)
    return times, None


def measure(found: MaskStats, compile_schema: Compiler, schema: dict[str, Any],
            tokens: list[int], eos: int) -> None:
    """Compile `schema` and drive it through `tokens`, adding the times to `found`."""
    start = time.perf_counter()
    try:
        driver = compile_schema(schema)
    except Exception as exc:  # each library raises its own kind
        found.error = f"compile failed: {str(exc).splitlines()[0][:80]}"
        return
    found.compile_ms.append(1000 * (time.perf_counter() - start))
    try:
        times, found.rejected_at = drive(driver, tokens, eos)
    finally:
        driver.close()
    found.mask_ms += [1000 * wall for wall, _ in times]
    found.mask_cpu_ms += [1000 * cpu for _, cpu in times]


def bench_masks(args: argparse.Namespace) -> dict[str, Any]:
    vocab = Vocab(args.model_path)
    engines: dict[str, Compiler] = {}
    setup_s: dict[str, float | str] = {}
    for name, make in LIBRARIES.items():
        start = time.perf_counter()
        try:
            engines[name] = make(vocab, args.threads)
            setup_s[name] = time.perf_counter() - start
        except ImportError:
            setup_s[name] = "not installed"
    tokens = {name: vocab.tokenize(json.dumps(doc, separators=SEPARATORS))
              for name, (_, doc) in SCHEMAS.items()}
    stats = {schema: {name: MaskStats() for name in engines} for schema in SCHEMAS}
    for repeat in range(args.mask_repeats):  # every repeat compiles afresh (no caches)
        for schema, (spec, _) in SCHEMAS.items():
            for name, compile_schema in engines.items():
                found = stats[schema][name]
                if not found.error:
                    measure(found, compile_schema, spec, tokens[schema], vocab.eos)
                done = found.error or (f"compile {found.compile_ms[-1]:.1f} ms, "
                                       f"mask p99 {pct(found.mask_ms, 99)} ms so far")
                print(f"  pass {repeat + 1}, {schema}, {name}: {done}", file=sys.stderr)
    return {"n_vocab": vocab.n_vocab, "repeats": args.mask_repeats, "setup_s": setup_s,
            "tokens": tokens, "stats": {s: {n: vars(f) for n, f in by.items()}
                                        for s, by in stats.items()}}


# -- (b) throughput with and without json_schema -------------------------------------------------


def bench_throughput(args: argparse.Namespace) -> dict[str, Any]:
    from bench_features import modelyard_server, run_requests  # needs modelyard
    from bench_serving import PROMPTS

    from modelyard.config import load_config

    args.data_dir = args.data_dir or load_config().data_dir
    conversations = [[{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} Outline it "
                       "as JSON: title, author, genre, chapters, tags."}]
                     for i in range(args.requests)]
    schema_format = {"type": "json_schema",
                     "json_schema": {"name": "story", "schema": NESTED, "strict": True}}
    modes: dict[str, dict[str, Any]] = {"off": {}, "on": {"response_format": schema_format}}
    runs: list[dict[str, Any]] = []
    with modelyard_server(args, prefix_caching=True) as server:
        for extra in modes.values():  # untimed: fills the prefix cache, warms both paths
            asyncio.run(run_requests(server, conversations, args.concurrency, args.max_tokens,
                                     **extra))
        for round_no in range(args.rounds):
            for mode, extra in modes.items():  # A B A B: drift hits both alike
                results, wall = asyncio.run(run_requests(
                    server, conversations, args.concurrency, args.max_tokens, **extra))
                tokens = sum(r.completion_tokens for r in results)
                runs.append({"round": round_no, "mode": mode, "tokens": tokens, "wall_s": wall,
                             "requests": len(results)})
                print(f"  json_schema {mode}, round {round_no}: {tokens / wall:.1f} tok/s",
                      file=sys.stderr)

    def total(mode: str, key: str) -> float:
        return float(sum(r[key] for r in runs if r["mode"] == mode))

    rate = {mode: total(mode, "tokens") / total(mode, "wall_s") for mode in modes}
    per_request = {mode: total(mode, "tokens") / total(mode, "requests") for mode in modes}
    return {"concurrency": args.concurrency, "requests": args.requests,
            "max_tokens": args.max_tokens, "rounds": args.rounds,
            "off_tokens_per_s": rate["off"], "on_tokens_per_s": rate["on"],
            "ratio": rate["on"] / rate["off"], "tokens_per_request": per_request, "runs": runs}


# -- report ------------------------------------------------------------------------------------


def pct(values: list[float], q: float, spec: str = ".3f") -> str:
    return format(np.percentile(values, q), spec) if values else "-"


def mask_table(masks: dict[str, Any]) -> str:
    rows = ["| schema | tokens | library | compile ms (p50) | mask p50 ms | mask p99 ms | "
            "mask max ms | CPU p99 ms | note |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for schema, by_library in masks["stats"].items():
        n = len(masks["tokens"][schema])
        for name in LIBRARIES:
            s = by_library.get(name)
            if s is None:
                rows.append(f"| {schema} | {n} | {name} | - | - | - | - | - | not installed |")
                continue
            note = s["error"] or ("" if s["rejected_at"] is None
                                  else f"rejected the document at token {s['rejected_at']}")
            rows.append(f"| {schema} | {n} | {name} | {pct(s['compile_ms'], 50, '.1f')} | "
                        f"{pct(s['mask_ms'], 50)} | {pct(s['mask_ms'], 99)} | "
                        f"{pct(s['mask_ms'], 100)} | {pct(s['mask_cpu_ms'], 99)} | {note} |")
    return "\n".join(rows)


def table(results: dict[str, Any]) -> str:
    rows = list(RESULT_TABLE_HEAD)
    if masks := results.get("mask"):
        for schema, by_library in masks["stats"].items():
            s = by_library["llguidance"]
            p99 = float(np.percentile(s["mask_ms"], 99)) if s["mask_ms"] else float("inf")
            accepted = s["rejected_at"] is None and s["error"] is None
            value = (f"{p99:.3f} ({pct(s['mask_cpu_ms'], 99)}) ms"
                     + ("" if accepted else ", rejected the document"))
            rows.append(row("mask time", f"llguidance p99 (CPU p99), {schema} schema", value,
                            f"<= {MASK_TARGET_MS:g} ms", accepted and p99 <= MASK_TARGET_MS))
    if t := results.get("throughput"):
        rows += [
            row("json_schema", f"output tok/s off / on, concurrency {t['concurrency']}",
                f"{t['off_tokens_per_s']:.1f} / {t['on_tokens_per_s']:.1f}"),
            row("json_schema", "output tokens per request off / on",
                f"{t['tokens_per_request']['off']:.1f} / {t['tokens_per_request']['on']:.1f}"),
            row("json_schema", "constrained / unconstrained", f"{t['ratio']:.2f}x",
                f">= {THROUGHPUT_TARGET:g}x", t["ratio"] >= THROUGHPUT_TARGET)]
    return "\n".join(rows)


PARTS = ("mask", "throughput")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="the server's threads, and xgrammar's compiler threads")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of "
                   f"{','.join(PARTS)} (default all)")
    p.add_argument("--model-path", type=Path, help="default: modelyard's packaged model")
    p.add_argument("--data-dir", type=Path, help="MODELYARD_DATA_DIR for the server")
    p.add_argument("--quick", action="store_true", help="smoke test: small sizes")
    args = p.parse_args(argv)
    args.parts = [part for part in args.parts.split(",") if part]
    if unknown := set(args.parts) - set(PARTS):
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    sizes = dict(mask_repeats=5, requests=16, concurrency=8, max_tokens=64, rounds=2)
    if args.quick:
        sizes.update(mask_repeats=1, requests=4, concurrency=4, max_tokens=16, rounds=1)
    # the server's engine, as bench_features runs it
    vars(args).update(sizes, max_sequences=16, context_per_sequence=4096, step_token_budget=512)
    if args.model_path is None:
        try:
            resolve_default_model(args)
        except ImportError:
            p.error("modelyard is not installed here: pass --model-path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()   # so the server is still stopped
    info = {**machine("llguidance", "xgrammar", "llama-cpp-python"), "threads": args.threads,
            "model": str(args.model_path)}
    benches = {"mask": bench_masks, "throughput": bench_throughput}
    results = {part: bench(args) for part, bench in benches.items() if part in args.parts}
    print(f"\nmachine: {info['cpu']} | cores {info['cores']} | threads {args.threads} | "
          f"load average at start {info['load_average_at_start']:.2f} | llguidance "
          f"{info['llguidance']}, xgrammar {info['xgrammar']}, llama-cpp-python "
          f"{info['llama_cpp_python']}"
          f"{' | QUICK: sizes too small for the targets' if args.quick else ''}")
    if masks := results.get("mask"):
        setup = ", ".join(f"{name} {v:.1f} s" if isinstance(v, float) else f"{name} {v}"
                          for name, v in masks["setup_s"].items())
        print(f"\nMask time per token, vocabulary of {masks['n_vocab']} tokens, "
              f"{masks['repeats']} pass(es) over each document (vocabulary setup: {setup}):\n")
        print(mask_table(masks))
    print()
    print(table(results))
    save_results("grammar", {"machine": info, **results}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
