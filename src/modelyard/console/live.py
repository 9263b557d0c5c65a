"""What the operator's system page shows live: each deployment's breaker, active requests
and tries by outcome (router/metrics.py) and the engine's queue, running sequences and
tokens generated (engine/metrics.py), read from the server's Prometheus registry, the
same numbers /metrics exports."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry

from modelyard.router.breaker import CLOSED, HALF_OPEN, OPEN

BREAKERS = {0.0: CLOSED, 1.0: HALF_OPEN, 2.0: OPEN}
OUTCOMES = ("ok", "retried", "refused", "failed")


def snapshot(registry: CollectorRegistry) -> dict[str, Any]:
    deployments: dict[tuple[str, str], dict[str, Any]] = {}
    engine: dict[str, float] = {}

    def deployment(labels: dict[str, str]) -> dict[str, Any]:
        key = (labels.get("model", ""), labels.get("deployment", ""))
        return deployments.setdefault(key, {
            "model": key[0], "deployment": key[1], "breaker": CLOSED, "active": 0,
            "tries": dict.fromkeys(OUTCOMES, 0)})

    for family in registry.collect():
        for sample in family.samples:
            name = sample.name
            if name == "modelyard_deployment_breaker_state":
                deployment(sample.labels)["breaker"] = BREAKERS.get(sample.value, "unknown")
            elif name == "modelyard_deployment_active_requests":
                deployment(sample.labels)["active"] = int(sample.value)
            elif name == "modelyard_deployment_tries_total":
                tries = deployment(sample.labels)["tries"]
                tries[sample.labels.get("outcome", "")] = int(sample.value)
            elif name in ("modelyard_queue_depth", "modelyard_running_sequences",
                          "modelyard_kv_cells_reserved", "modelyard_generated_tokens_total",
                          "modelyard_prompt_tokens_total"):
                # summed over the engines when several run (one per local model)
                short = name.removeprefix("modelyard_").removesuffix("_total")
                engine[short] = engine.get(short, 0.0) + sample.value
    return {"time": time.time(), "engine": engine or None,
            "deployments": [deployments[key] for key in sorted(deployments)]}
