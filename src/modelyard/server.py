"""Assemble a running server from a Config: resolve the model, start the engine, build the app."""

from __future__ import annotations

import hashlib
import logging

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from modelyard import __version__
from modelyard.api.app import create_app
from modelyard.api.state import AppState
from modelyard.config import Config
from modelyard.engine.metrics import EngineMetrics
from modelyard.models import resolve_model_source
from modelyard.providers.local import LocalProvider

logger = logging.getLogger(__name__)


def build_app(config: Config, *, progress: bool = True) -> FastAPI:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_source(config.model.source, config.models_dir, progress=progress)
    registry = CollectorRegistry()
    provider = LocalProvider(config, model_path, EngineMetrics(registry))
    fingerprint = hashlib.sha256(f"{__version__}:{model_path.name}".encode()).hexdigest()[:10]
    state = AppState(providers={provider.model_id: provider}, registry=registry,
                     system_fingerprint=f"fp_{fingerprint}")
    logger.info("serving %s from %s", provider.model_id, model_path)
    return create_app(state)
