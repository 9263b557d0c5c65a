"""The decode gate: one holder at a time, handed over in arrival order."""

from __future__ import annotations

import threading
import time

from modelyard.engine.decode_gate import DecodeGate


def test_waiters_get_the_gate_in_arrival_order_before_the_holder_again() -> None:
    gate = DecodeGate()
    order: list[str] = []
    inside = threading.Lock()

    def turn(name: str) -> None:
        with gate:
            assert inside.acquire(blocking=False)  # nobody else holds it
            order.append(name)
            time.sleep(0.01)
            inside.release()

    gate.__enter__()
    threads = []
    for name in ("b", "c", "d"):
        thread = threading.Thread(target=turn, args=(name,))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)  # each queued before the next
    gate.__exit__(None, None, None)
    turn("a")  # the holder comes back last: the queue went first
    for thread in threads:
        thread.join(5)
    assert order == ["b", "c", "d", "a"]
