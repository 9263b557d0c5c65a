"""End-to-end: fair share between accounts. On a one-slot server, account A holds the slot
and has a backlog waiting; account B's request, sent after the whole backlog, gets the slot
next (first come, first served would give it to A's oldest waiting request)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer, metric_value, running_server

ONE_SLOT = """
[engine]
max_sequences = 1
context_per_sequence = 1024
step_token_budget = 64
max_waiting = 16

[model.defaults]
temperature = 0.0
"""
BACKLOG = 2
NO_END = {str(token): -100 for token in (151643, 151645, 151662, 151663, 151664)}
"""The model's end-of-generation tokens, banned: the slot's holder runs until it is let go."""


@pytest.fixture(scope="module")
def one_slot_server(data_dir: Path, default_model_path: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(data_dir, ONE_SLOT, tmp_path_factory.mktemp("fair-server")) as server:
        yield server


def _wait_for_queue(server: RunningServer, depth: int) -> None:
    deadline = time.monotonic() + 60
    while metric_value(server.metrics(), "modelyard_queue_depth") != depth:
        if time.monotonic() > deadline:
            pytest.fail(f"the queue never held {depth}:\n{server.metrics()}")
        time.sleep(0.05)


def test_a_second_account_is_admitted_ahead_of_a_first_accounts_backlog(
        one_slot_server: RunningServer) -> None:
    server = one_slot_server
    clients = {name: openai.OpenAI(base_url=server.api_url, max_retries=0, timeout=120,
                                   api_key=server.create_key(name, balance="1000"))
               for name in ("flood", "light")}
    firsts: list[str] = []
    """Which request got its first content, in order (each holds the slot until it ends)."""
    lock = threading.Lock()

    def ask(account: str, tag: str) -> None:
        stream = clients[account].chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say hello to {tag}."}],
            max_tokens=2, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                with lock:
                    firsts.append(tag)
                break
        for _ in stream:
            pass

    holder = clients["flood"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 500."}],
        max_tokens=800, stream=True, logit_bias=NO_END)
    for chunk in holder:   # A's long request holds the only slot
        if chunk.choices and chunk.choices[0].delta.content:
            break
    threads = []
    for tag, account in [*[(f"A{i}", "flood") for i in range(BACKLOG)], ("B", "light")]:
        thread = threading.Thread(target=ask, args=(account, tag))
        thread.start()
        threads.append(thread)
        _wait_for_queue(server, len(threads))   # queued in this order
    holder.close()   # the slot frees: whose turn is it?
    for thread in threads:
        thread.join(timeout=120)
    for client in clients.values():
        client.close()

    assert sorted(firsts) == [*(f"A{i}" for i in range(BACKLOG)), "B"]
    assert firsts[0] == "B"                                  # ahead of A's whole backlog
    assert firsts[1:] == [f"A{i}" for i in range(BACKLOG)]   # A's in the order it sent them
