"""Assemble a running server from a Config: the platform's database, the model, the app."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from modelyard import __version__
from modelyard.api.app import create_app
from modelyard.api.state import AppState
from modelyard.config import Config
from modelyard.engine.metrics import EngineMetrics
from modelyard.models import resolve_model_source
from modelyard.platform import service
from modelyard.providers.local import LocalProvider

logger = logging.getLogger(__name__)


def announce_admin_key(key: str) -> None:
    """Print a newly created admin key, the only time it is ever shown."""
    print("modelyard: created the admin API key. It is shown only this once; store it now:\n"
          f"modelyard: admin key: {key}", file=sys.stdout, flush=True)


def build_app(config: Config, *, progress: bool = True) -> FastAPI:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    admin_key = asyncio.run(service.prepare(config, create_admin=True))
    if admin_key is not None:
        announce_admin_key(admin_key)
    model_path = resolve_model_source(config.model.source, config.models_dir, progress=progress)
    registry = CollectorRegistry()
    provider = LocalProvider(config, model_path, EngineMetrics(registry))
    fingerprint = hashlib.sha256(f"{__version__}:{model_path.name}".encode()).hexdigest()[:10]
    state = AppState(providers={provider.model_id: provider}, registry=registry,
                     gate=service.accounts_gate(config), prices=service.prices(config),
                     system_fingerprint=f"fp_{fingerprint}")
    logger.info("serving %s from %s", provider.model_id, model_path)
    return create_app(state)
