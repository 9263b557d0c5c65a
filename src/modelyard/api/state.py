"""What the routes share: the providers by model id and the metrics registry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from modelyard.providers.base import Provider


@dataclass
class AppState:
    providers: dict[str, Provider]
    registry: CollectorRegistry
    system_fingerprint: str = "fp_modelyard"
    started: int = field(default_factory=lambda: int(time.time()))
