"""The embedding models a server answers for, from its config: the built-in one
([embedding]) and the catalog's `task = "embedding"` models."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from modelyard.config import Config
from modelyard.engine.embedder import Embedder
from modelyard.engine.embedding_model import EmbeddingModelConfig, LlamaEmbeddingModel
from modelyard.engine.metrics import EmbeddingMetrics
from modelyard.models.embedding_sources import resolve_embedding_source
from modelyard.providers.embeddings import EmbeddingService, LocalEmbeddings
from modelyard.providers.upstream_embeddings import UpstreamEmbeddings

logger = logging.getLogger(__name__)


def build_embeddings(config: Config, environ: Mapping[str, str],
                     registry: CollectorRegistry | None = None) -> dict[str, EmbeddingService]:
    models: dict[str, EmbeddingService] = {}
    settings = config.embedding
    if settings.enabled:
        path = resolve_embedding_source(settings.source, config.models_dir)
        model = LlamaEmbeddingModel(EmbeddingModelConfig(
            path, settings.batch_size, settings.max_sequences, settings.threads))
        embedder = Embedder(model, model.config.batch_tokens, settings.max_waiting,
                            EmbeddingMetrics(registry))
        models[settings.id] = LocalEmbeddings(settings.id, model, embedder,
                                              truncatable=settings.truncatable)
        logger.info("serving embeddings of %s from %s", settings.id, path)
    for entry in config.models:
        if entry.task == "embedding":
            models[entry.id] = UpstreamEmbeddings(entry, config.router, environ)
    return models
