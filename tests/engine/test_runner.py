"""The llama.cpp runner on the real default model, including the AMX repacking crash guard."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from modelyard.engine.runner import BatchItem, LlamaRunner, RunnerConfig, model_params


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
