"""One typed configuration: defaults, then a TOML file, then environment, then CLI flags.

Every section is a pydantic dataclass with `extra="forbid"` and strict types (no "8000" for
an integer, no `true` for a number), validated when the server starts: a bad value raises
`ConfigError` naming the file and the key, so a typo never surfaces later as a stack trace.

Callers import everything from `modelyard.config`; the modules behind it hold one part each:
`base` (strict types, defaults, `ConfigError`, price and byte checks), `engine` ([engine],
[model]), `server` ([platform], [server]), `catalog` ([router], [[models]] and their
deployments), `embedding` ([embedding]), `loader` (`Config`, `load_config`,
`with_overrides`) and `messages` (validation errors in the file's terms).
"""

from __future__ import annotations

from .base import (
    DEFAULT_EMBEDDING_ID,
    DEFAULT_EMBEDDING_SOURCE,
    DEFAULT_MODEL_ID,
    DEFAULT_MODEL_SOURCE,
    PROFILES,
    Capability,
    ConfigError,
    Flag,
    Int,
    NonEmpty,
    NonNegative,
    Num,
    Positive,
    PositiveNum,
    PriceUnits,
    Profile,
    Seconds,
    Text,
    parse_bytes,
)
from .catalog import CatalogModelConfig, DeploymentConfig, RouterConfig
from .embedding import EmbeddingConfig
from .engine import EngineConfig, ModelConfig
from .loader import Config, load_config, with_overrides
from .messages import describe
from .server import PlatformConfig, ServerConfig

__all__ = [
    "DEFAULT_EMBEDDING_ID",
    "DEFAULT_EMBEDDING_SOURCE",
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_SOURCE",
    "PROFILES",
    "Capability",
    "CatalogModelConfig",
    "Config",
    "ConfigError",
    "DeploymentConfig",
    "EmbeddingConfig",
    "EngineConfig",
    "Flag",
    "Int",
    "ModelConfig",
    "NonEmpty",
    "NonNegative",
    "Num",
    "PlatformConfig",
    "Positive",
    "PositiveNum",
    "PriceUnits",
    "Profile",
    "RouterConfig",
    "Seconds",
    "ServerConfig",
    "Text",
    "describe",
    "load_config",
    "parse_bytes",
    "with_overrides",
]
