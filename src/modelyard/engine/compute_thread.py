"""Every llama.cpp computation of the process on one thread.

llama.cpp's CPU backend (built with OpenMP) runs each decode on a thread team that belongs
to the calling thread, and the team lives as long as that thread. While two teams live in
one process (two living threads that have each run a multi-threaded decode: an engine and
the embedding worker, two local models' engines, or the main thread before an engine),
there are more OpenMP threads than cores, and libgomp then throttles its workers'
spinning between parallel regions, so they sleep and are woken again (the likely cause:
with OMP_WAIT_POLICY=PASSIVE one team was as slow as two). Measured on 2
cores: an engine's steps took 28% longer for the rest of the process once another living
thread had run one 2-thread decode, and none longer when that thread had ended. So the
engines and the embedding model hand their `llama_decode` and `llama_encode` calls to this
one thread, and the process has one team. A call costs a thread handoff (tens of
microseconds) against steps of milliseconds. Calls from several engines run one at a
time, in the order they arrive (the executor's queue): the engines take turns on the
cores, and an engine waiting for its decode goes before the one that just decoded, whose
next call queues behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelyard-llama")
_thread_ident: int | None = None


def _note_thread() -> None:
    global _thread_ident
    _thread_ident = threading.get_ident()


def on_compute_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `function` on the process's llama.cpp thread and return what it returns (or
    raise what it raises); called from that thread, it runs at once."""
    if threading.get_ident() == _thread_ident:
        return function(*args, **kwargs)
    return _executor.submit(function, *args, **kwargs).result()


_executor.submit(_note_thread).result()
