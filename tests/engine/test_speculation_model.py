"""Speculative decoding on the real default model: the same greedy texts, seeded texts,
logprobs, stop strings and max_tokens with speculation on as off, on prompts whose answers
repeat the prompt (editing code, repeating a list) and one whose answer does not, and under
a JSON schema whose answer copies a record from the prompt."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelyard.engine.engine import Engine, EngineOutput
from modelyard.engine.grammar import Constraint, GrammarCompiler
from modelyard.engine.runner import LlamaRunner, RunnerConfig
from modelyard.engine.scheduler import SchedulerConfig
from modelyard.engine.sequence import SamplingParams
from modelyard.engine.speculation import SpeculationConfig

SLOTS = 2
CONTEXT = 1536
_unique = itertools.count()

CODE = '''def parse_line(line: str) -> tuple[str, int]:
    name, _, count = line.partition("=")
    return name.strip(), int(count)


def parse_file(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.strip():
            name, count = parse_line(line)
            counts[name] = counts.get(name, 0) + count
    return counts


def render(counts: dict[str, int]) -> str:
    return "\\n".join(f"{name} = {count}" for name, count in sorted(counts.items()))
'''

PROMPTS = {
    "edit": "Here is a Python file:\n\n```python\n" + CODE + "```\n\nRename `parse_line` to "
            "`split_line` everywhere. Reply with the whole file and nothing else.",
    "repeat": "Repeat this list exactly, one item per line: alpha, beta, gamma, delta, "
              "epsilon, zeta, eta, theta, iota, kappa, lambda, mu.",
    "chat": "Write three sentences about the sea.",
}


@pytest.fixture(scope="module")
def runner(default_model_path: Path) -> Iterator[LlamaRunner]:
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=SLOTS,
                                      n_ctx=SLOTS * CONTEXT, n_batch=256, threads=2))
    yield runner
    runner.close()


def _prompt(runner: LlamaRunner, user: str) -> list[int]:
    return runner.tokenize(
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def _generate(runner: LlamaRunner, speculation: SpeculationConfig | None,
              requests: list[tuple[list[int], SamplingParams]],
              constraint: Constraint | None = None
              ) -> tuple[list[list[EngineOutput]], float]:
    """Run `requests` one after another on a fresh engine over `runner`, each on an empty
    KV cache (where earlier requests' cells lie in the cache moves the attention's sums in
    the last digits, which is not what is compared here) and under `constraint`; their
    outputs and the share of draft tokens kept."""
    runner.clear_all()
    engine = Engine(runner, SchedulerConfig(
        max_sequences=SLOTS, step_token_budget=256, kv_capacity=SLOTS * CONTEXT,
        context_per_sequence=CONTEXT, max_waiting=8, speculation=speculation),
        grammar=GrammarCompiler(runner.grammar_tokenizer(), runner.n_vocab))
    engine.start()

    async def one(prompt: list[int], params: SamplingParams) -> list[EngineOutput]:
        engine.clear_prefix_cache()   # applied before the submit: the inbox keeps order
        queue = engine.submit(f"spec-{next(_unique)}", prompt, params,
                              constraint=constraint)
        outputs = []
        while True:
            output = await asyncio.wait_for(queue.get(), timeout=300)
            assert output.error is None, output.error
            outputs.append(output)
            if output.finish_reason is not None:
                return outputs

    try:
        results = [asyncio.run(one(prompt, params)) for prompt, params in requests]
    finally:
        engine.stop()
        runner.clear_all()
    drafted = engine.metrics.draft_tokens._value.get()
    kept = engine.metrics.accepted_draft_tokens._value.get()
    return results, (kept / drafted if drafted else 0.0)


def _text(outputs: list[EngineOutput]) -> str:
    return "".join(o.text for o in outputs)


def _logprobs(outputs: list[EngineOutput]) -> list[tuple[int, float]]:
    return [(token, lp.logprob) for o in outputs for token, lp in o.logprobs]


def test_greedy_texts_logprobs_and_usage_are_the_same_with_speculation(
        runner: LlamaRunner) -> None:
    requests = [(_prompt(runner, text), SamplingParams(temperature=0.0, max_tokens=160,
                                                       logprobs=True, top_logprobs=2))
                for text in PROMPTS.values()]
    plain, _ = _generate(runner, None, requests)
    fast, kept = _generate(runner, SpeculationConfig(), requests)
    for name, without, with_drafts in zip(PROMPTS, plain, fast, strict=True):
        assert _text(with_drafts) == _text(without), name
        assert with_drafts[-1].num_output_tokens == without[-1].num_output_tokens, name
        assert with_drafts[-1].finish_reason == without[-1].finish_reason, name
        tokens = [t for t, _ in _logprobs(without)]
        assert [t for t, _ in _logprobs(with_drafts)] == tokens, name
        # The values are llama.cpp's: a token verified inside a chunk of several takes
        # other kernels than a token decoded alone (see the README), hence not bit-equal.
        assert [lp for _, lp in _logprobs(with_drafts)] == pytest.approx(
            [lp for _, lp in _logprobs(without)], abs=0.05), name
    assert kept > 0.5  # the edit and the list are mostly copied: drafts were kept


def test_a_seed_gives_the_same_text_with_speculation(runner: LlamaRunner) -> None:
    requests = [(_prompt(runner, PROMPTS["edit"]),
                 SamplingParams(temperature=0.7, top_p=0.95, seed=seed, max_tokens=96))
                for seed in (1, 2)]
    plain, _ = _generate(runner, None, requests)
    fast, _ = _generate(runner, SpeculationConfig(), requests)
    assert [_text(o) for o in fast] == [_text(o) for o in plain]
    assert _text(plain[0]) != _text(plain[1])  # the seeds do draw


def test_stop_strings_and_max_tokens_cut_where_they_do_without_drafts(
        runner: LlamaRunner) -> None:
    prompt = _prompt(runner, PROMPTS["edit"])
    requests = [(prompt, SamplingParams(temperature=0.0, max_tokens=200, stop=("counts[",))),
                (prompt, SamplingParams(temperature=0.0, max_tokens=37))]
    plain, _ = _generate(runner, None, requests)
    fast, _ = _generate(runner, SpeculationConfig(), requests)
    stopped, cut = fast
    assert _text(stopped) == _text(plain[0]) and "counts[" not in _text(stopped)
    assert stopped[-1].finish_reason == plain[0][-1].finish_reason == "stop"
    assert stopped[-1].num_output_tokens == plain[0][-1].num_output_tokens
    assert _text(cut) == _text(plain[1])
    assert cut[-1].num_output_tokens == 37 and cut[-1].finish_reason == "length"


RECORD = {"name": "Ada Lovelace", "born": 1815, "languages": ["English", "French", "Italian"],
          "field": "mathematics", "known_for": "notes on the Analytical Engine"}
SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "born", "languages", "field", "known_for"],
          "properties": {"name": {"type": "string"}, "born": {"type": "integer"},
                         "languages": {"type": "array", "items": {"type": "string"}},
                         "field": {"type": "string"}, "known_for": {"type": "string"}}}


def test_drafts_under_a_json_schema_are_masked_at_every_position(runner: LlamaRunner) -> None:
    # The record in the prompt is written as the grammar writes JSON (no spaces) and is
    # followed by more text: drafts copied from it run past the closing brace, where the
    # grammar is complete and the walk must end.
    record = json.dumps(RECORD, separators=(",", ":"))
    prompt = _prompt(runner, "Here is a record: " + record + " That was the "
                     "record. Reply with the record as JSON, unchanged.")
    compiler = GrammarCompiler(runner.grammar_tokenizer(), runner.n_vocab)
    constraint = compiler.json_schema(SCHEMA, strict=True)
    requests = [(prompt, SamplingParams(temperature=0.0, max_tokens=120, logprobs=True)),
                (prompt, SamplingParams(temperature=0.8, seed=7, max_tokens=120))]
    plain, _ = _generate(runner, None, requests, constraint)
    fast, kept = _generate(runner, SpeculationConfig(), requests, constraint)
    for without, with_drafts in zip(plain, fast, strict=True):
        assert _text(with_drafts) == _text(without)
        assert with_drafts[-1].num_output_tokens == without[-1].num_output_tokens
        assert with_drafts[-1].finish_reason == without[-1].finish_reason == "stop"
        assert set(json.loads(_text(with_drafts))) == set(RECORD)
    assert [t for t, _ in _logprobs(fast[0])] == [t for t, _ in _logprobs(plain[0])]
    assert kept > 0.5  # the record is copied: drafts were verified under the mask and kept
