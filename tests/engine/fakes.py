"""A scripted stand-in for the llama.cpp runner, shared by the engine tests (no model needed).

It replaces only the runner, the one module that calls llama.cpp, so the scheduler, sampler,
detokenizer and stop strings under test are the real ones. Tokens 1-26 are the letters a-z
and 0 ends the generation.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from modelyard.engine.runner import BatchItem, RunnerError

VOCAB = 32
EOG = 0
LETTERS = {i: chr(ord("a") + i - 1).encode() for i in range(1, 27)}


def spell(text: str) -> list[int]:
    """The tokens of lowercase `text`, one per letter."""
    return [ord(ch) - ord("a") + 1 for ch in text]


class ScriptedRunner:
    """Greedy logits that spell `script` (then the end token) after a prompt of `prompt_len`
    tokens, for every sequence: one row for each position asked for, the last `num_logits`
    tokens of an item that wants logits (several when the engine verifies draft tokens).
    It records what it was asked to do, can be told to fail once and to be slow."""

    eog_ids = frozenset({EOG})

    def __init__(self, script: str, prompt_len: int) -> None:
        self.script = [*spell(script), EOG]
        self.prompt_len = prompt_len
        self.fail_next = False
        """The next decode raises `RunnerError` (once)."""
        self.decoded_batches: list[list[BatchItem]] = []
        self.cleared = 0
        self.truncations: list[tuple[int, int]] = []
        self.copies: list[tuple[int, int, int]] = []
        self.slow = 0.0
        """Seconds each decode takes."""

    def token_bytes(self, token: int) -> bytes:
        return LETTERS.get(token, b"")

    def decode(self, items: list[BatchItem]) -> npt.NDArray[np.float32]:
        if self.fail_next:
            self.fail_next = False
            raise RunnerError("scripted failure")
        self.decoded_batches.append(items)
        if self.slow:
            time.sleep(self.slow)
        rows = []
        for item in items:
            if not item.want_logits:
                continue
            end = item.start + len(item.tokens)
            for position in range(end - item.num_logits, end):
                produced = position + 1 - self.prompt_len
                row = np.zeros(VOCAB, dtype=np.float32)
                row[self.script[min(produced, len(self.script) - 1)]] = 10.0
                rows.append(row)
        return np.array(rows, dtype=np.float32).reshape(len(rows), VOCAB)

    def truncate_slot(self, slot: int, keep: int) -> None:
        self.truncations.append((slot, keep))

    def copy_prefix(self, source: int, slot: int, n: int) -> None:
        self.copies.append((source, slot, n))

    def clear_all(self) -> None:
        self.cleared += 1
