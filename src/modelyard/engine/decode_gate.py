"""One `llama_decode` at a time across the engines of a process, in arrival order.

Several local models each run an engine of their own (its own context and loop thread).
Each decode already spreads over every core (`engine.threads`); two at once would run twice
the threads on the same cores, and llama.cpp's threads spin while they wait for each
other, so oversubscribed decodes are slower than taking turns. The engines take turns
through this gate instead: a waiting engine gets the cores next, before the engine that
just held them can take them again (a plain lock lets the thread that released it win
again). An engine alone, or the only busy one, holds the gate uncontended at every step.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class DecodeGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._waiting: deque[threading.Lock] = deque()

    def __enter__(self) -> None:
        with self._lock:
            if not self._busy:
                self._busy = True
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        turn.acquire()  # released by the holder, which hands the gate over

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._busy = False
