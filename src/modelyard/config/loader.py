"""The whole configuration (`Config`) and how it is read: defaults, then a TOML file, then
environment, then CLI flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import platformdirs
from pydantic import Field, Strict, TypeAdapter, ValidationError, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from .base import _FORBID, DEFAULT_MODEL_SOURCE, ConfigError, Flag, Text
from .catalog import CatalogModelConfig, RouterConfig
from .embedding import EmbeddingConfig
from .engine import EngineConfig, ModelConfig
from .messages import describe
from .server import PlatformConfig, ServerConfig

_DERIVED = ("local_model", "engine_model_listed")
"""Config fields computed from the file's shape, never read from it."""


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("modelyard"))


@dataclass(frozen=True, config=_FORBID)
class Config:
    host: Text = "127.0.0.1"
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] = 8000
    """0: any free port."""
    data_dir: Path = Field(default_factory=_default_data_dir)
    log_level: Text = "info"
    database_url: Text | None = None
    """SQLAlchemy URL of the platform's database; None: SQLite in the data directory."""
    redis_url: Text | None = None
    """Redis for rate limits shared by several gateways; None: limits in this process."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    platform: PlatformConfig = Field(default_factory=PlatformConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: tuple[CatalogModelConfig, ...] = ()
    """The catalog ([[models]]), besides the built-in engine's [model]."""
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    """The built-in embedding model ([embedding])."""
    local_model: Flag = True
    """Run the built-in engine: true unless the file has [[models]] only and none of them
    has a local deployment."""
    engine_model_listed: Flag = True
    """Serve the engine's model under its own id ([model]): false when the file has
    [[models]] and no [model] table (the engine then answers only as a catalog model's
    local deployment, at that model's prices)."""

    @field_validator("data_dir", mode="before")
    @classmethod
    def _expand_home(cls, value: object) -> object:
        if isinstance(value, str | Path):
            return Path(value).expanduser()
        raise ValueError("must be a string")

    @field_validator("models")
    @classmethod
    def _ids_are_unique(cls, value: tuple[CatalogModelConfig, ...],
                        info: ValidationInfo) -> tuple[CatalogModelConfig, ...]:
        engine_model = info.data.get("model")
        ids = [engine_model.id] if isinstance(engine_model, ModelConfig) else []
        ids += [m.id for m in value]
        for model_id in ids:
            if ids.count(model_id) > 1:
                raise ValueError(f"must give each model its own id: {model_id!r} is used "
                                 "more than once")
        return value

    @field_validator("embedding")
    @classmethod
    def _embedding_id_is_free(cls, value: EmbeddingConfig,
                              info: ValidationInfo) -> EmbeddingConfig:
        engine_model = info.data.get("model")
        ids = [m.id for m in info.data.get("models", ())]
        if isinstance(engine_model, ModelConfig):
            ids.append(engine_model.id)
        if value.enabled and value.id in ids:
            raise ValueError(f"id {value.id!r} is already a model's; give the embedding model "
                             "its own id")
        return value

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def platform_database_url(self) -> str:
        """The database the platform uses: `database_url`, or SQLite in the data dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'modelyard.db'}"


_CONFIG = TypeAdapter(Config)


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Defaults, overlaid by the TOML file at `path`, overlaid by `MODELYARD_*` variables."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    where = f"{path}: " if path is not None else ""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    derived = [key for key in _DERIVED if key in raw]
    if derived:
        raise ConfigError(f"{where}unknown key in config: {', '.join(derived)}")
    try:
        config = _CONFIG.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(where + describe(exc, raw)) from None
    if "models" in raw:
        local = "model" in raw or any(
            d.kind == "local" and d.source is None for m in config.models
            for d in m.deployments)
        config = _replace(config, where, local_model=local, engine_model_listed="model" in raw)
    for i, model in enumerate(config.models):
        for j, deployment in enumerate(model.deployments):
            name = deployment.api_key_env
            if deployment.kind != "local" and name is not None and not env.get(name):
                raise ConfigError(f"{where}models[{i}] ({model.id}).deployments[{j}]"
                                  f".api_key_env: the environment variable {name} is not set")
    overrides = {key: env[f"MODELYARD_{key.upper()}"]
                 for key in ("data_dir", "database_url", "redis_url")
                 if env.get(f"MODELYARD_{key.upper()}")}
    return _replace(config, "environment: ", **overrides)


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Apply command-line flags (None means not given) on top of a loaded config."""
    top = {k: v for k, v in overrides.items() if v is not None and k in ("host", "port")}
    model = config.model
    if overrides.get("model") is not None:
        source = str(overrides["model"])
        model = _replace(model, "", source=source)
        if overrides.get("model_id") is None and source != DEFAULT_MODEL_SOURCE:
            model = _replace(model, "", id=_id_from_source(source))
    if overrides.get("model_id") is not None:
        model = _replace(model, "", id=str(overrides["model_id"]))
    return _replace(config, "", model=model, **top)


_Section = TypeVar("_Section", Config, ModelConfig)


def _replace(value: _Section, where: str, **changes: Any) -> _Section:
    """`dataclasses.replace`, which validates the changes, with the config's own errors."""
    try:
        return dataclasses.replace(value, **changes)
    except ValidationError as exc:
        section: tuple[str, ...] = ("model",) if isinstance(value, ModelConfig) else ()
        raise ConfigError(where + describe(exc, {}, section)) from None


def _id_from_source(source: str) -> str:
    name = source.removeprefix("pypi:").rsplit("/", 1)[-1]
    return name[: -len(".gguf")] if name.endswith(".gguf") else name
