"""Every llama.cpp computation on one thread, whoever asks for it."""

from __future__ import annotations

import threading

import pytest

from modelyard.engine.compute_thread import on_compute_thread


def test_calls_from_any_thread_run_on_the_one_compute_thread() -> None:
    seen: list[int] = []

    def ask() -> None:
        seen.append(on_compute_thread(threading.get_ident))

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    seen.append(on_compute_thread(threading.get_ident))
    assert len(set(seen)) == 1
    assert seen[0] != threading.get_ident()


def test_results_and_errors_come_back_to_the_caller() -> None:
    assert on_compute_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        on_compute_thread(lambda: 1 / 0)


def test_a_call_from_the_compute_thread_runs_at_once() -> None:
    """No deadlock: the one thread does not wait for itself."""
    inner = on_compute_thread(lambda: on_compute_thread(threading.get_ident))
    assert inner == on_compute_thread(threading.get_ident)
