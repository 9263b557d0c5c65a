"""Interrupting a heavy account's step for a light account's request, on the real default
model: the interrupted steps are done again and every request ends whole."""

from __future__ import annotations

import asyncio
from pathlib import Path

from modelyard.engine.engine import Engine, EngineOutput
from modelyard.engine.runner import LlamaRunner, RunnerConfig
from modelyard.engine.scheduler import SchedulerConfig
from modelyard.engine.sequence import SamplingParams, Share

SLOTS = 4
CONTEXT = 512


def test_light_requests_interrupt_the_heavy_steps_and_everything_ends_whole(
        default_model_path: Path) -> None:
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=SLOTS,
                                      n_ctx=SLOTS * CONTEXT, n_batch=256, threads=1))
    engine = Engine(runner, SchedulerConfig(
        max_sequences=SLOTS, step_token_budget=256, kv_capacity=SLOTS * CONTEXT,
        context_per_sequence=CONTEXT, max_waiting=64, max_cached_cells=2 * CONTEXT,
        reserved_slots=1, pause_heavy_every=2, interrupt_heavy_steps=True))
    engine.start()
    heavy, light = Share("heavy"), Share("light")

    def prompt(text: str) -> list[int]:
        return runner.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")

    async def collect(queue: asyncio.Queue[EngineOutput]) -> list[EngineOutput]:
        outputs = []
        while not outputs or outputs[-1].finish_reason is None:
            outputs.append(await asyncio.wait_for(queue.get(), timeout=120))
            assert outputs[-1].error is None, outputs[-1].error
        return outputs

    async def main() -> tuple[list[list[EngineOutput]], list[list[EngineOutput]]]:
        floods = [engine.submit(f"heavy-{i}", prompt(f"Tell a long story number {i}."),
                                SamplingParams(max_tokens=160, temperature=0.0),
                                share=heavy) for i in range(SLOTS - 1)]
        flooding = asyncio.gather(*(collect(queue) for queue in floods))
        await asyncio.sleep(0.5)   # the heavy answers are decoding
        lights = []
        for i in range(6):   # each comes while a heavy step runs (the engine is never idle)
            lights.append(await collect(engine.submit(
                f"light-{i}", prompt(f"Say the number {i}."),
                SamplingParams(max_tokens=4, temperature=0.0), share=light)))
            await asyncio.sleep(0.1)
        return list(await flooding), lights

    try:
        floods, lights = asyncio.run(main())
    finally:
        engine.stop()
        runner.close()
    assert engine.metrics.interrupted_steps._value.get() >= 1
    assert engine.scheduler.interrupted_steps >= 1
    for outputs in floods:   # every answer ends as a model's answer does, none cut short
        assert outputs[-1].finish_reason in ("stop", "length")
        assert outputs[-1].num_output_tokens > 8
        assert "".join(o.text for o in outputs).strip()
    for outputs in lights:
        assert outputs[-1].num_output_tokens <= 4
        assert "".join(o.text for o in outputs)
