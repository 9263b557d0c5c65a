"""Hostile clients against one real server: each attack of tests/adversarial/attacks.py at
a small size, answered as it should be, in SPEC.md's error shape, while /health keeps
answering; afterwards the ledger still adds up. benchmarks/adversarial.py runs the same
attacks at full size and reports what each costs the server.

The server runs the built-in engine (small) for the attacks on the model itself, and
priced catalog models on the fault upstream where the model is not the point. The attacks
that could stall a server that lacks a defence run last, so a failure there cannot mask
the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.attacks import (
    ATTACKS,
    COMMENTS_TIMEOUT_S,
    Attack,
    Target,
    hostile_config,
    make_target,
)
from tests.adversarial.harness import HealthWatch, record
from tests.adversarial.ledger_invariant import assert_ledger_holds
from tests.e2e.server import RunningServer, running_server
from tests.router.fault_process import running_fault_server

HEALTH_SLOWEST_S = 2.0
LAST = ("many_tiny_messages", "n128_twice")
ORDER = sorted(ATTACKS, key=lambda attack: attack.run.__name__ in LAST)


@pytest.fixture(scope="module")
def hostile(data_dir: Path, default_model_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Target]]:
    workdir = tmp_path_factory.mktemp("hostile")
    with running_fault_server() as fault, \
            running_server(data_dir, hostile_config(fault), workdir) as server:
        yield server, make_target(server)


@pytest.mark.parametrize("attack", ORDER, ids=[a.run.__name__ for a in ORDER])
def test_an_attack_gets_its_answer_and_health_keeps_answering(
        attack: Attack, hostile: tuple[RunningServer, Target]) -> None:
    server, target = hostile
    with HealthWatch(server.base_url) as health:
        answer = attack.run(target, False)
    record(attacks=1, attacks_answered_right=int(answer.ok))
    assert answer.ok, (f"{attack.name}: expected {attack.expected}, got {answer.status} "
                       f"after {answer.seconds:.1f} s ({answer.note})")
    assert health.failures == 0, f"/health failed {health.failures} times during it"
    assert health.slowest_s < HEALTH_SLOWEST_S, \
        f"/health took {health.slowest_s:.1f} s to answer during it"


def test_the_ledger_adds_up_after_the_attacks(hostile: tuple[RunningServer, Target]) -> None:
    server, _ = hostile
    assert server.process.poll() is None, "the server died"
    database = Path(server.log_path).parent / "platform.db"
    assert_ledger_holds(f"sqlite:///{database}", wait_s=COMMENTS_TIMEOUT_S + 10)
