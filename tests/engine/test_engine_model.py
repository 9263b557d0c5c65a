"""The engine on the real default model: seeds reproduce a text with and without prefix-cache
hits, prefix-cache reuse stays inside a cache scope, one grammar compile per request."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llguidance
import pytest

from modelyard.engine import grammar as grammar_module
from modelyard.engine.engine import Engine, EngineOutput
from modelyard.engine.grammar import GrammarCompiler
from modelyard.engine.runner import LlamaRunner, RunnerConfig
from modelyard.engine.scheduler import SchedulerConfig
from modelyard.engine.sequence import SamplingParams

SLOTS = 4
CONTEXT = 512
_unique = itertools.count()


@pytest.fixture(scope="module")
def runner(default_model_path: Path) -> Iterator[LlamaRunner]:
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=SLOTS,
                                      n_ctx=SLOTS * CONTEXT, n_batch=256, threads=1))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def engine(runner: LlamaRunner) -> Iterator[Engine]:
    engine = Engine(runner, SchedulerConfig(
        max_sequences=SLOTS, step_token_budget=256, kv_capacity=SLOTS * CONTEXT,
        context_per_sequence=CONTEXT, max_waiting=64, max_cached_cells=2 * CONTEXT),
        grammar=GrammarCompiler(runner.grammar_tokenizer(), runner.n_vocab))
    engine.start()
    yield engine
    engine.stop()


def _prompt(runner: LlamaRunner, user: str) -> list[int]:
    # A system prompt no other test sends, so no earlier test's cells are reused by accident.
    return runner.tokenize(
        f"<|im_start|>system\nYou are assistant number {next(_unique)}.<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def _ask(engine: Engine, prompt: list[int], params: SamplingParams, *, n: int = 1,
         scope: str | None = None, **kwargs: Any) -> list[list[EngineOutput]]:
    async def main() -> list[list[EngineOutput]]:
        queue = engine.submit(f"req-{next(_unique)}", prompt, params, n, cache_scope=scope,
                              **kwargs)
        by_choice: dict[int, list[EngineOutput]] = {i: [] for i in range(n)}
        ended = 0
        while ended < n:
            output = await asyncio.wait_for(queue.get(), timeout=120)
            assert output.error is None, output.error
            by_choice[output.index].append(output)
            ended += output.finish_reason is not None
        return [by_choice[i] for i in range(n)]

    return asyncio.run(main())


def _text(outputs: list[EngineOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_a_seed_gives_one_text_cache_cold_and_warm(runner: LlamaRunner,
                                                    engine: Engine) -> None:
    """Twenty runs of one request at temperature 1, one after the other: every odd one after
    the prefix cache was emptied (a cold read), every even one with the whole prompt but its
    last token from the cache (a warm read). The prompt is long enough that llama.cpp reads
    a chunk of it on a different attention path than a single token."""
    rules = " ".join(f"Rule {i}: be kind." for i in range(8))
    prompt = _prompt(runner, f"{rules} Write one sentence about the sea.")
    assert len(prompt) > 64
    params = SamplingParams(temperature=1.0, seed=20260, max_tokens=4, logprobs=True)
    texts, first_logprobs, cached = set(), set(), []
    for i in range(20):
        if i % 2 == 0:
            engine.clear_prefix_cache()
        [outputs] = _ask(engine, prompt, params)
        texts.add(_text(outputs))
        first_logprobs.add(outputs[0].logprobs[0][1].logprob)
        cached.append(outputs[-1].num_cached_tokens)
    assert cached == [0, len(prompt) - 1] * 10
    assert len(first_logprobs) == 1    # the very same distribution, not merely the same draw
    assert len(texts) == 1, texts


def test_a_second_scope_gets_no_cached_tokens_and_the_same_scope_gets_the_hit(
        runner: LlamaRunner, engine: Engine) -> None:
    prompt = _prompt(runner, "Name a colour.")
    params = SamplingParams(temperature=0, max_tokens=2)

    def cached(scope: str | None) -> int:
        return _ask(engine, prompt, params, scope=scope)[0][-1].num_cached_tokens

    a, b = f"account-a-{next(_unique)}", f"account-b-{next(_unique)}"  # scopes new here
    hit = len(prompt) - 1
    assert cached(a) == 0
    assert cached(b) == 0                    # a's cells exist, but b may not read them
    assert cached(None) < hit                # nor may the shared scope (it may have
    assert cached(a) == hit                  # cells of its own for the template's start)
    assert cached(b) == hit
    assert cached(None) == hit


def test_a_requests_grammar_is_compiled_once_when_made_never_per_choice(
        runner: LlamaRunner, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine.grammar is not None
    constraint = engine.grammar.json_schema(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
         "additionalProperties": False}, strict=True)
    assert constraint.compiled is not None   # compiled where the request is prepared
    compiled = []
    real = llguidance.LLMatcher

    def counting(*args: Any, **kwargs: Any) -> llguidance.LLMatcher:
        compiled.append(args[1:])   # a spy around the real class: it still compiles
        return real(*args, **kwargs)

    monkeypatch.setattr(grammar_module.llguidance, "LLMatcher", counting)
    results = _ask(engine, _prompt(runner, "Give me a JSON object with a number n."),
                   SamplingParams(temperature=1.0, seed=3, max_tokens=40), n=4,
                   constraint=constraint)
    assert compiled == []   # submit (on the event loop) copies, for each of the 4 choices
    for outputs in results:
        assert set(json.loads(_text(outputs))) == {"n"}


def test_matchers_copied_from_one_compile_move_independently(runner: LlamaRunner,
                                                             engine: Engine) -> None:
    assert engine.grammar is not None
    constraint = engine.grammar.lark('start: "yes" | "no"')
    first, second = engine.grammar.matchers(constraint, 2)
    before = second.allowed()
    yes = runner.tokenize("yes", add_special=False)
    assert before[yes[0]]
    for token in yes:
        first.consume(token)
    assert first.done and not second.done
    assert (second.allowed() == before).all()
    [third] = engine.grammar.matchers(constraint, 1)   # the compiled template is untouched
    assert (third.allowed() == before).all()
