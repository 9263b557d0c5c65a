"""The operator's live numbers read back from the metrics registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from modelyard.console.live import snapshot
from modelyard.engine.metrics import EngineMetrics
from modelyard.router.breaker import Breaker
from modelyard.router.metrics import RouterMetrics


def test_the_snapshot_reads_deployments_and_the_engine() -> None:
    registry = CollectorRegistry()
    router = RouterMetrics(registry)
    engine = EngineMetrics(registry)
    breaker = Breaker(failures=1)
    router.watch("up", "east", breaker, lambda: 3)
    router.watch("up", "west", Breaker(), lambda: 0)
    router.tried("up", "east", "ok")
    router.tried("up", "east", "ok")
    router.tried("up", "east", "retried")
    breaker.failure(0.0)
    engine.queue_depth.set(2)
    engine.running.set(5)
    engine.generated_tokens.inc(42)
    found = snapshot(registry)
    east, west = found["deployments"]
    assert (east["deployment"], east["breaker"], east["active"]) == ("east", "open", 3)
    assert east["tries"] == {"ok": 2, "retried": 1, "refused": 0, "failed": 0}
    assert (west["breaker"], west["active"]) == ("closed", 0)
    assert found["engine"]["queue_depth"] == 2
    assert found["engine"]["running_sequences"] == 5
    assert found["engine"]["generated_tokens"] == 42
    empty = snapshot(CollectorRegistry())
    assert (empty["engine"], empty["deployments"]) == (None, [])
