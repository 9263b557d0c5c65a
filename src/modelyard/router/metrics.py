"""The router's Prometheus metrics: each deployment's breaker and the outcome of each try."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from modelyard.router.breaker import CLOSED, HALF_OPEN, OPEN, Breaker

BREAKER_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.breaker = Gauge("modelyard_deployment_breaker_state",
                             "A deployment's circuit breaker: 0 closed, 1 half-open, 2 open.",
                             ["model", "deployment"], registry=r)
        self.active = Gauge("modelyard_deployment_active_requests",
                            "Requests a deployment is answering now.", ["model", "deployment"],
                            registry=r)
        self.tries = Counter("modelyard_deployment_tries",
                             "Requests sent to a deployment, by outcome before the first byte "
                             "(ok; retried: failed and tried elsewhere; refused: the client's "
                             "request refused; failed: an answer that could not be read).",
                             ["model", "deployment", "outcome"], registry=r)
        self._tries: dict[tuple[str, str, str], Counter] = {}

    def watch(self, model: str, deployment: str, breaker: Breaker,
              active: Callable[[], int]) -> None:
        """Read the breaker's state and the deployment's active count at each scrape."""
        self.breaker.labels(model, deployment).set_function(
            lambda: BREAKER_VALUES[breaker.state])
        self.active.labels(model, deployment).set_function(lambda: float(active()))

    def tried(self, model: str, deployment: str, outcome: str) -> None:
        key = (model, deployment, outcome)
        child = self._tries.get(key)
        if child is None:
            child = self._tries[key] = self.tries.labels(*key)
        child.inc()
