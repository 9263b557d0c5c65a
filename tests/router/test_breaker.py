"""The circuit breaker and the weighted choice, as pure logic: no clock, no network."""

from __future__ import annotations

import random
from collections import Counter

from modelyard.router.balancer import choose
from modelyard.router.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


def test_opens_after_consecutive_failures_only() -> None:
    breaker = Breaker(failures=3, cooldown=10)
    breaker.failure(0)
    breaker.failure(0)
    breaker.success()  # a success resets the count
    breaker.failure(1)
    breaker.failure(1)
    assert breaker.state == CLOSED and breaker.available(1)
    breaker.failure(2)
    assert breaker.state == OPEN
    assert not breaker.available(11.9) and not breaker.acquire(11.9)
    assert breaker.retry_after(5) == 7


def test_half_open_lets_one_probe_through_and_its_outcome_decides() -> None:
    breaker = Breaker(failures=1, cooldown=10)
    breaker.failure(0)
    assert breaker.acquire(10)
    assert breaker.state == HALF_OPEN
    assert not breaker.acquire(10)  # one probe at a time
    breaker.failure(10)
    assert breaker.state == OPEN and not breaker.available(19)
    assert breaker.acquire(20)
    breaker.success()
    assert breaker.state == CLOSED and breaker.acquire(20) and breaker.acquire(20)


def test_a_probe_without_a_verdict_frees_the_half_open_slot() -> None:
    breaker = Breaker(failures=1, cooldown=1)
    breaker.failure(0)
    assert breaker.acquire(1)
    breaker.release()
    assert breaker.acquire(1)


def test_weighted_choice_follows_the_weights() -> None:
    rng = random.Random(7)
    counts = Counter(choose(["a", "b", "c"], {"a": 1, "b": 2, "c": 7}.__getitem__, rng)
                     for _ in range(10_000))
    assert abs(counts["a"] - 1000) < 150 and abs(counts["b"] - 2000) < 200
    assert choose([], lambda _: 1.0) is None
    assert choose(["only"], lambda _: 1.0) == "only"
