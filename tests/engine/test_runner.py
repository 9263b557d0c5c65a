"""The llama.cpp runner on the real default model, including the AMX repacking crash guard."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from modelyard.engine.compute_thread import on_compute_thread
from modelyard.engine.engine import Engine, EngineOutput
from modelyard.engine.runner import (
    BatchItem,
    DecodeInterrupted,
    LlamaRunner,
    RunnerConfig,
    RunnerError,
    model_params,
)
from modelyard.engine.scheduler import SchedulerConfig
from modelyard.engine.sequence import SamplingParams


def test_weights_are_never_repacked() -> None:
    # Repacking into extra CPU buffer types segfaults llama_decode on AMX CPUs.
    assert model_params(0).use_extra_bufts is False


def test_batched_decode_survives_in_a_fresh_process(default_model_path: Path) -> None:
    """A crash inside llama_decode kills the process, so run it in a child and read its code."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        from modelyard.engine.runner import BatchItem, LlamaRunner, RunnerConfig
        runner = LlamaRunner(RunnerConfig(Path({str(default_model_path)!r}), n_seq_max=4,
                                          n_ctx=1024, n_batch=128, threads=2))
        prompt = runner.tokenize("<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n")
        rows = runner.decode([BatchItem(s, 0, prompt, True) for s in range(4)])
        tokens = [int(row.argmax()) for row in rows]
        for step in range(4):
            rows = runner.decode([BatchItem(s, len(prompt) + step, [tokens[s]], True)
                                  for s in range(4)])
            tokens = [int(row.argmax()) for row in rows]
        print("decoded", tokens)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-2000:]}"
    assert "decoded" in result.stdout


def test_logits_rows_follow_the_batch_order(default_model_path: Path) -> None:
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=2, n_ctx=512, n_batch=64,
                                      threads=2))
    try:
        a = runner.tokenize("<|im_start|>user\nSay yes<|im_end|>\n<|im_start|>assistant\n")
        b = runner.tokenize("<|im_start|>user\nWrite C code<|im_end|>\n<|im_start|>assistant\n")
        together = np.array(runner.decode([BatchItem(0, 0, a, True), BatchItem(1, 0, b, True)]))
        runner.clear_slot(0)
        runner.clear_slot(1)
        alone_b = np.array(runner.decode([BatchItem(1, 0, b, True)]))
        assert together.shape == (2, runner.n_vocab)
        assert int(together[1].argmax()) == int(alone_b[0].argmax())
        assert runner.token_bytes(runner.tokenize("hello", add_special=False)[0]) == b"hello"
        assert runner.eos_id in runner.eog_ids
        assert "im_start" in (runner.chat_template() or "")
    finally:
        runner.close()


def test_an_8_bit_kv_cache_needs_flash_attention(tmp_path: Path) -> None:
    # Refused before anything is loaded (the path does not exist).
    with pytest.raises(RunnerError, match="flash attention"):
        LlamaRunner(RunnerConfig(tmp_path / "absent.gguf", n_seq_max=1, n_ctx=256, n_batch=32,
                                 flash_attention=False, kv_cache_type="q8_0"))
    with pytest.raises(RunnerError, match="unknown KV cache type"):
        LlamaRunner(RunnerConfig(tmp_path / "absent.gguf", n_seq_max=1, n_ctx=256, n_batch=32,
                                 kv_cache_type="q4_0"))


def test_an_8_bit_kv_cache_holds_a_cell_in_17_32nds_of_the_bytes(
        default_model_path: Path) -> None:
    """llama.cpp's saved state of a sequence grows by one cell's keys and values per token:
    2 bytes a value in f16, 34 bytes per 32 values in q8_0 (plus a few bytes of position
    and sequence id per cell in both)."""
    per_cell = {}
    for kind in ("f16", "q8_0"):
        runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=1, n_ctx=256,
                                          n_batch=128, threads=2, kv_cache_type=kind))
        try:
            prompt = runner.tokenize("The quick brown fox jumps over the lazy dog. " * 8)[:96]
            runner.decode([BatchItem(0, 0, prompt[:32], False)])
            small = llama_cpp.llama_state_seq_get_size(runner._ctx, 0)
            runner.decode([BatchItem(0, 32, prompt[32:], False)])
            large = llama_cpp.llama_state_seq_get_size(runner._ctx, 0)
            per_cell[kind] = (large - small) / (len(prompt) - 32)
        finally:
            runner.close()
    assert per_cell["q8_0"] / per_cell["f16"] == pytest.approx(17 / 32, rel=0.01)


def test_an_engine_on_an_8_bit_kv_cache_answers_greedily(default_model_path: Path) -> None:
    """Two greedy requests decoded together on a q8_0 cache: each answer is the one the
    question asks for (a cache read back wrong gives other text), and asking again gives
    the same text."""
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=2, n_ctx=1024, n_batch=128,
                                      threads=2, kv_cache_type="q8_0"))
    engine = Engine(runner, SchedulerConfig(max_sequences=2, step_token_budget=128,
                                            kv_capacity=1024, context_per_sequence=512,
                                            max_waiting=8, max_cached_cells=512))
    engine.start()
    questions = ["Count from 1 to 12, separated by commas. Write only the numbers.",
                 "Write the English alphabet in capital letters."]
    prompts = [runner.tokenize(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
               for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=40)

    async def ask(request_id: str, prompt: list[int]) -> str:
        queue = engine.submit(request_id, prompt, params)
        outputs: list[EngineOutput] = []
        while not outputs or outputs[-1].finish_reason is None:
            outputs.append(await asyncio.wait_for(queue.get(), timeout=120))
            assert outputs[-1].error is None, outputs[-1].error
        return "".join(o.text for o in outputs)

    async def both(tag: str) -> list[str]:
        return list(await asyncio.gather(*(ask(f"{tag}-{i}", p) for i, p in enumerate(prompts))))

    try:
        first = asyncio.run(both("a"))
        again = asyncio.run(both("b"))
    finally:
        engine.stop()
        runner.close()
    assert "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12" in first[0]
    assert "ABCDEFGHIJKLMNOP" in first[1].replace(" ", "").replace(",", "")
    assert again == first


def test_an_interrupted_decode_keeps_nothing_of_its_batch(default_model_path: Path) -> None:
    """`interrupt` stops a decode (here set before it starts, so it stops at the first
    graph node); the cache is as before it, so the same batch decoded again gives the
    logits an uninterrupted run gives."""
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=2, n_ctx=512, n_batch=64,
                                      threads=2))
    try:
        prompt = runner.tokenize("<|im_start|>user\nWrite a haiku about rain<|im_end|>\n"
                                 "<|im_start|>assistant\n")
        head, tail = prompt[:8], prompt[8:]

        def run(interrupt: bool) -> np.ndarray:
            runner.clear_all()
            runner.decode([BatchItem(0, 0, head, False), BatchItem(1, 0, prompt, False)])
            items = [BatchItem(0, len(head), tail, True),
                     BatchItem(1, len(prompt), [int(prompt[-1])], True)]
            if interrupt:
                runner.interrupt()
                with pytest.raises(DecodeInterrupted):
                    runner.decode(items)
                runner.clear_interrupt()
            return np.array(runner.decode(items))

        plain = run(interrupt=False)
        again = run(interrupt=True)
        assert np.array_equal(plain, again)
    finally:
        runner.close()


def test_interrupt_from_another_thread_stops_a_long_decode(default_model_path: Path) -> None:
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=1, n_ctx=2048,
                                      n_batch=1024, threads=2))
    try:
        tokens = runner.tokenize("lorem ipsum dolor sit amet " * 200, add_special=False)[:1024]
        outcome: list[str] = []

        def decode() -> None:
            try:
                runner.decode([BatchItem(0, 0, tokens, True)])
                outcome.append("finished")
            except DecodeInterrupted:
                outcome.append("interrupted")

        worker = threading.Thread(target=decode)
        worker.start()
        time.sleep(0.01)  # 1024 prompt tokens take far longer than this on any CPU
        runner.interrupt()
        worker.join(timeout=60)
        assert outcome == ["interrupted"]
        runner.clear_interrupt()
        rows = runner.decode([BatchItem(0, 0, tokens[:16], True)])  # the slot is empty again
        assert rows.shape == (1, runner.n_vocab)
    finally:
        runner.close()


def test_step_costs_are_measured_in_one_token_steps(default_model_path: Path) -> None:
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=2, n_ctx=512, n_batch=64,
                                      threads=2))
    try:
        costs = runner.measure_step_costs(sizes=(1, 2, 8), repeats=1)
        assert [n for n, _ in costs] == [1, 2, 8]
        assert costs[0][1] == 1.0 and all(cost > 0 for _, cost in costs)
        assert costs[2][1] > 1.0   # eight tokens take longer than one on any backend here
        prompt = runner.tokenize("<|im_start|>user\nhi<|im_end|>\n")
        assert runner.decode([BatchItem(0, 0, prompt, True)]).shape[0] == 1  # slot 0 empty
        big = runner.measure_step_costs(sizes=(1, 32, 128), repeats=1)
        assert [n for n, _ in big] == [1, 32]   # a step past n_batch is not measured
    finally:
        runner.close()


def test_step_costs_are_timed_in_one_job_on_the_compute_thread(
        default_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timed decode runs on the compute thread itself, and another engine's decode
    asked for meanwhile waits until the measurement ends instead of falling between."""
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=2, n_ctx=512, n_batch=64,
                                      threads=2))
    compute_thread = on_compute_thread(threading.get_ident)
    events: list[str] = []
    other: list[threading.Thread] = []
    decode = runner.decode

    def recording_decode(items: list[BatchItem]) -> np.ndarray:
        events.append("measure" if threading.get_ident() == compute_thread else "elsewhere")
        if not other:
            other.append(threading.Thread(target=on_compute_thread,
                                          args=(events.append, "other")))
            other[0].start()
            time.sleep(0.05)  # the other job is queued on the compute thread by now
        return decode(items)

    monkeypatch.setattr(runner, "decode", recording_decode)
    try:
        runner.measure_step_costs(sizes=(1, 2), repeats=2)
        other[0].join()
        assert events[-1] == "other"
        assert events[:-1] == ["measure"] * (1 + 3 * 2)   # the context, then 3 sizes x 2
    finally:
        runner.close()
