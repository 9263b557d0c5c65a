"""The pool of local models a config names: each `[[models]]` entry whose local deployment
has a `source` becomes a `ManagedModel` whose engine `LocalPool` loads when asked for.

Every engine is a `LocalProvider` of its own (llama.cpp model, context, scheduler and loop
thread), built from the server's config with the catalog entry's id, sampling defaults
and completion cap; `[engine]` (slots, context per sequence, threads) applies to each.
A decode of any of them uses every core (`engine.threads`), and the engines' decodes
run one at a time, in arrival order, on the process's one llama.cpp thread
(engine/compute_thread.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prometheus_client import CollectorRegistry

from modelyard.config import CatalogModelConfig, Config, DeploymentConfig, ModelConfig
from modelyard.engine.metrics import EngineMetrics
from modelyard.models import resolve_model_source
from modelyard.models.gguf_memory import read_shape
from modelyard.providers.base import ChatModel
from modelyard.providers.local import LocalProvider
from modelyard.providers.local_pool import LocalPool, ModelSpec
from modelyard.providers.managed import ManagedModel


def pooled_deployment(model: CatalogModelConfig) -> DeploymentConfig | None:
    """The model's local deployment with a source of its own, if it has one."""
    return next((d for d in model.deployments if d.kind == "local" and d.source is not None),
                None)


def engine_memory(config: Config, path: Path) -> int:
    """The estimate of what an engine of `path` holds under `[engine]`."""
    engine = config.engine
    return read_shape(path).memory_bytes(engine.max_sequences * engine.context_per_sequence,
                                         engine.max_sequences, engine.kv_cache_type)


def engine_config(config: Config, model: CatalogModelConfig,
                  deployment: DeploymentConfig) -> Config:
    """The config a pooled model's engine runs under: the server's, with the model as its
    [model] and the deployment's own `speculation` switch, if it has one."""
    assert deployment.source is not None
    engine = config.engine if deployment.speculation is None else \
        dataclasses.replace(config.engine, speculation=deployment.speculation)
    return dataclasses.replace(config, models=(), engine=engine, model=ModelConfig(
        id=model.id, source=deployment.source, default_max_tokens=model.default_max_tokens,
        defaults=model.defaults))


def build_local_models(config: Config, registry: CollectorRegistry, *,
                       metrics: EngineMetrics | None,
                       reserved_bytes: int = 0, progress: bool = True,
                       ) -> tuple[LocalPool | None, dict[str, ManagedModel]]:
    """The pool and its models by catalog id (none: no pool). Sources are resolved now
    (a packaged model assembled, a path checked), so a wrong one stops the start."""
    pooled = [(model, deployment) for model in config.models if model.task == "chat"
              and (deployment := pooled_deployment(model)) is not None]
    if not pooled:
        return None, {}
    paths: dict[str, Path] = {}
    configs: dict[str, Config] = {}
    specs: list[ModelSpec] = []
    for model, deployment in pooled:
        assert deployment.source is not None
        path = resolve_model_source(deployment.source, config.models_dir, progress=progress)
        paths[model.id] = path
        configs[model.id] = engine_config(config, model, deployment)
        idle = deployment.idle_unload_seconds
        specs.append(ModelSpec(
            model.id, engine_memory(config, path), preload=deployment.preload,
            idle_unload_seconds=config.engine.idle_unload_seconds if idle is None else idle,
            description={"context_length": config.engine.context_per_sequence,
                         "capabilities": {name: name in model.capabilities for name in
                                          ("tools", "json_schema", "reasoning", "vision")}}))

    def load(spec: ModelSpec) -> ChatModel:
        return LocalProvider(configs[spec.model_id], paths[spec.model_id], metrics)

    engine = config.engine
    pool = LocalPool(specs, load, memory_budget=engine.memory_budget,
                     reserved_bytes=reserved_bytes, load_timeout_s=engine.load_timeout_seconds)
    registry.register(pool)
    models = {spec.model_id: ManagedModel(pool, spec, engine.context_per_sequence,
                                          configs[spec.model_id].model.default_max_tokens)
              for spec in specs}
    return pool, models
