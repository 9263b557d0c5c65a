"""Assemble a running server from a Config: the platform's database, the model, the app."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys

from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from modelyard import __version__
from modelyard.api.app import create_app
from modelyard.api.preparation import Preparation
from modelyard.api.state import AppState
from modelyard.config import Config
from modelyard.engine.metrics import EngineMetrics
from modelyard.models import resolve_model_source
from modelyard.platform import service
from modelyard.platform.response_store import DatabaseResponses
from modelyard.providers.base import ChatModel
from modelyard.providers.embedding_catalog import build_embeddings
from modelyard.providers.local import LocalProvider
from modelyard.providers.local_models import build_local_models, engine_memory, pooled_deployment
from modelyard.router.catalog import build_catalog

logger = logging.getLogger(__name__)


def announce_admin_key(key: str) -> None:
    """Print a newly created admin key, the only time it is ever shown."""
    print("modelyard: created the admin API key. It is shown only this once; store it now:\n"
          f"modelyard: admin key: {key}", file=sys.stdout, flush=True)


def build_app(config: Config, *, progress: bool = True) -> ASGIApp:
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # its own user's only
    admin_key = asyncio.run(service.prepare(config, create_admin=True))
    if admin_key is not None:
        announce_admin_key(admin_key)
    registry = CollectorRegistry()
    providers: dict[str, ChatModel] = {}
    local: ChatModel | None = None
    fingerprint_source = "catalog"
    pooled = any(pooled_deployment(model) for model in config.models)
    engine_metrics = EngineMetrics(registry) if config.local_model or pooled else None
    reserved = 0
    if config.local_model:
        model_path = resolve_model_source(config.model.source, config.models_dir,
                                          progress=progress)
        local = LocalProvider(config, model_path, engine_metrics)
        reserved = engine_memory(config, model_path)
        if config.engine_model_listed:
            providers[local.model_id] = local
        fingerprint_source = model_path.name
        logger.info("serving %s from %s", local.model_id, model_path)
    pool, engines = build_local_models(config, registry, metrics=engine_metrics,
                                       reserved_bytes=reserved, progress=progress)
    if pool is not None:
        pool.preload()
    chat_models = tuple(model for model in config.models if model.task == "chat")
    providers.update(build_catalog(chat_models, config.router, os.environ, local, registry,
                                   engines))
    fingerprint = hashlib.sha256(f"{__version__}:{fingerprint_source}".encode()).hexdigest()
    gate = service.accounts_gate(config, registry)
    state = AppState(providers=providers, registry=registry, gate=gate,
                     responses=DatabaseResponses(gate.db),
                     system_fingerprint=f"fp_{fingerprint[:10]}",
                     usage_drain_seconds=config.router.usage_drain_seconds, engine=local,
                     max_requests_in_flight=config.server.limit_concurrency,
                     max_body_bytes=config.server.max_body_bytes,
                     body_timeout_s=config.server.body_timeout_seconds,
                     max_request_tokens=config.platform.max_request_tokens,
                     preparation=Preparation(config.server.prepare_concurrency,
                                             config.server.prepare_timeout_seconds),
                     embeddings=build_embeddings(config, os.environ, registry))
    return create_app(state)
