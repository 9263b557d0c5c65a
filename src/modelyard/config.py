"""One typed configuration: defaults, then a TOML file, then environment, then CLI flags.

Every section is a pydantic dataclass with `extra="forbid"` and strict types (no "8000" for
an integer, no `true` for a number), validated when the server starts: a bad value raises
`ConfigError` naming the file and the key, so a typo never surfaces later as a stack trace.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import platformdirs
from pydantic import (
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

from modelyard.errors import ModelyardError
from modelyard.sampling import Sampling
from modelyard.units import MAX_PRICE_MICROS, AmountError, to_micros

DEFAULT_MODEL_ID = "qwen2.5-coder-0.5b-instruct"
DEFAULT_MODEL_SOURCE = "pypi:qwen2.5-coder-0.5b-instruct"
DEFAULT_EMBEDDING_ID = "all-minilm-l6-v2"
DEFAULT_EMBEDDING_SOURCE = "pypi:all-minilm-l6-v2"

Profile = Literal["vllm", "sglang", "llamacpp", "ollama", "openai", "passthrough"]
PROFILES: tuple[str, ...] = get_args(Profile)
"""How SPEC.md's parameters reach a family of upstream servers (providers/profiles.py)."""
Capability = Literal["tools", "json_schema", "reasoning", "vision"]
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FORBID = ConfigDict(extra="forbid")
_DERIVED = ("local_model", "engine_model_listed")
"""Config fields computed from the file's shape, never read from it."""


class ConfigError(ModelyardError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


# Strict scalar types: an integer is never a bool, a float or text; a number (stored as a
# float) is an integer or a float, never a bool or text; a flag is true or false.
Int = Annotated[int, Strict()]
Num = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
NonEmpty = Annotated[str, Strict(), Field(min_length=1)]
NonNegative = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[int, Strict(), Field(ge=1)]
PositiveNum = Annotated[float, Strict(), Field(gt=0)]
Seconds = PositiveNum
PriceUnits = Annotated[float, Strict()]
"""Currency units per million tokens; checked by `_price` (at most 6 decimals, in bounds)."""

def _price(value: float | None, info: ValidationInfo) -> float | None:
    if value is None:
        return None
    name = info.field_name or "price"
    try:
        to_micros(value, what=name, maximum=MAX_PRICE_MICROS)
    except AmountError as exc:
        raise ValueError(str(exc).removeprefix(f"{name} ")) from None
    return value


@dataclass(frozen=True, config=_FORBID)
class EngineConfig:
    """How the built-in engine uses the machine."""

    max_sequences: Annotated[int, Strict(), Field(ge=1, le=256)] = 16
    """Sequences decoded together in one llama.cpp context (slots). 16 gave the most
    tokens/s in benchmarks/bench_serving.py on 2 cores; fewer gives lower per-token latency."""
    context_per_sequence: Annotated[int, Strict(), Field(ge=64)] = 4096
    """Tokens of KV cache each sequence may use (prompt + completion)."""
    step_token_budget: Int = 512
    """Tokens fed to one `llama_decode` call: decode tokens first, prefill chunks fill the
    rest; at least max_sequences."""
    max_waiting: NonNegative = 256
    """Requests allowed to wait for a slot; past this the server answers 503."""
    threads: NonNegative = 0
    """CPU threads for llama.cpp; 0 means one per core."""
    gpu_layers: NonNegative = 0
    """Layers offloaded to a GPU when llama.cpp was built for one."""
    flash_attention: Flag = True
    """Flash attention in llama.cpp; on the CPU it is faster at every batch size we measured."""
    kv_cache_type: Literal["f16", "q8_0"] = "f16"
    """The KV cache's number format: "q8_0" stores keys and values in 8 bits (about 1.9x
    the cells in the same memory; llama.cpp needs flash attention for it)."""
    prefix_caching: Flag = True
    """Reuse the KV cells of a finished sequence's prompt prefix for a new request."""
    speculation: Flag = False
    """Speculative decoding by prompt lookup (engine/speculation.py): draft tokens copied
    from the request's own prompt and output, verified in the batch's decode step; the
    text is the same as without it (greedy) or drawn from the same distribution."""
    speculation_max_draft: Annotated[int, Strict(), Field(ge=1, le=64)] = 16
    """Most draft tokens one sequence verifies in a step (fewer while its drafts fail)."""
    share_prefix_cache: Flag = False
    """Reuse cached prompt prefixes across accounts (one-tenant deployments). Off, each
    account reuses only its own, so no account can probe another's prompts."""
    fair_share: Flag = True
    """Share slots and prompt reading between accounts by weighted fair queuing (weights
    per account, priority per key; see engine/fair_share.py); false: first come, first
    served across all accounts."""
    reserved_slots: NonNegative = 1
    """With fair share, slots an account already holding one may not take while another
    account had work in the last 1024 steps, so a light account's request starts at once
    instead of waiting for one of a busy account's answers to end (a reserved slot may stay
    empty; an account alone for long gets every slot). One by default: without it a light
    account's first token waited seconds behind a flood (README, fair share); less than
    max_sequences (a one-slot engine keeps none)."""
    heavy_prefill_per_step: NonNegative = 64
    """With fair share, while another account has had work in the last 1024 steps: the
    most prompt tokens one step reads for an account holding at least its share of the
    slots (a light account's prompts are not capped), so the step a light account's
    request waits for is short: a step of 512 prompt tokens takes seconds on a CPU. The
    heavy account's prompts are read in more, shorter steps meanwhile. 0: no cap."""
    pause_heavy_every: NonNegative = 4
    """With fair share, a step that reads the prompt of an account holding fewer than its
    share of slots may pause the decoding of the accounts holding more than theirs for
    that step (nothing is dropped), so the light account's first token is not held up by
    a full batch: at most one step in this many on average (two in a row at most), so a
    heavy account keeps at least (N-1)/N of its decode steps; 0: never."""
    memory_budget: NonNegative = 0
    """Bytes the local models may hold together (an integer, or text such as "4GiB" or
    "512MB"): each model's GGUF file plus its KV cache (estimated from the file's
    metadata). Loading a `[[models]]` local model past it unloads the least recently used
    idle ones first; 0: no budget."""
    idle_unload_seconds: Annotated[float, Strict(), Field(ge=0)] = 600.0
    """A `[[models]]` local model with a `source` that answered no request for this long
    is unloaded (it loads again on its next request); 0: never."""
    load_timeout_seconds: Seconds = 120.0
    """How long a request waits for its model to load (then a 503 with Retry-After; the
    load goes on)."""

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _bytes(cls, value: object) -> object:
        return parse_bytes(value) if isinstance(value, str) else value

    @field_validator("step_token_budget")
    @classmethod
    def _budget_fits_every_sequence(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("max_sequences", 1):
            raise ValueError("must be at least engine.max_sequences")
        return value

    @field_validator("kv_cache_type")
    @classmethod
    def _quantized_cache_needs_flash_attention(cls, value: str, info: ValidationInfo) -> str:
        if value != "f16" and not info.data.get("flash_attention", True):
            raise ValueError(f'"{value}" needs engine.flash_attention = true '
                             "(llama.cpp quantizes the V cache only with flash attention)")
        return value

    @field_validator("reserved_slots")
    @classmethod
    def _reserve_leaves_a_slot(cls, value: int, info: ValidationInfo) -> int:
        slots = info.data.get("max_sequences", 1)
        if value >= slots > 1:   # one slot: nobody holding it can take another anyway
            raise ValueError("must be less than engine.max_sequences")
        return value


@dataclass(frozen=True, config=_FORBID)
class ModelConfig:
    """One model the server answers for."""

    id: NonEmpty = DEFAULT_MODEL_ID
    source: Text = DEFAULT_MODEL_SOURCE
    default_max_tokens: Positive | None = None
    """Completion cap when a request names none; None means what the context leaves."""
    input_price: PriceUnits = 0.0
    """Currency units per million prompt tokens."""
    cached_input_price: PriceUnits | None = None
    """Per million prompt tokens served from the prefix cache; None: the input price."""
    output_price: PriceUnits = 0.0
    """Currency units per million completion tokens."""
    defaults: Sampling = Field(default_factory=Sampling)
    """[model.defaults] in the config file: what a request that leaves a sampling field
    out gets (each field on its own; one set nowhere is OpenAI's default). The providers
    in SPEC.md often use, e.g., temperature 0.7, top_p 0.7, top_k 50: set them per model."""
    chat_template: Text | None = None
    """Path to a Jinja chat template that replaces the one stored in the GGUF."""

    _prices = field_validator("input_price", "cached_input_price", "output_price")(_price)


@dataclass(frozen=True, config=_FORBID)
class PlatformConfig:
    """Keys, balances and limits (the database and Redis are chosen at the top level)."""

    reservation_ttl_seconds: Seconds = 60.0
    """How long a reservation outlives its gateway: a running gateway keeps extending its
    own; one left by a crashed gateway is released this long after its last extension."""
    sweep_interval_seconds: Seconds = 10.0
    """How often expired reservations are looked for (and once at start)."""
    usage_retention_days: NonNegative = 365
    """Usage records older than this are deleted; 0 keeps them forever."""
    key_cache_seconds: Annotated[float, Strict(), Field(ge=0)] = 0.0
    """Remember a looked-up key this long; 0 (the default) reads it on every request, so a
    revocation is effective at once on every gateway."""
    redis_prefix: NonEmpty = "modelyard"
    """Prefix of every Redis key modelyard writes."""
    max_concurrent_per_key: NonNegative = 64
    """Requests of one API key in flight at once (a 429 beyond); 0: no limit."""
    max_concurrent_per_account: NonNegative = 128
    """Requests of all the keys of one account in flight at once (a 429 beyond); 0: none."""
    max_request_tokens: Positive = 32768
    """The most completion tokens a request with several choices may ask for in all
    (n x max_tokens; a 422 beyond); a single choice is bounded by the model's context."""


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
class ServerConfig:
    """The HTTP server's own limits ([server])."""

    max_body_bytes: NonNegative = 0
    """The largest request body read (a 413 beyond); 0: derived from the largest context
    served (16 bytes per token plus 1 MiB, at least 1 MiB)."""
    body_timeout_seconds: Seconds = 30.0
    """A request body must arrive within this long (a 408 beyond)."""
    prepare_concurrency: Positive = 4
    """Requests prepared at once (prompt rendering, tokenizing, grammar compilation), off
    the event loop."""
    prepare_timeout_seconds: Seconds = 10.0
    """A request whose preparation takes longer is refused (422); waiting longer for a
    preparation slot is a 503."""
    limit_concurrency: Positive = 2048
    """Requests the server answers at once; past it a 503 in SPEC.md's shape (uvicorn's own
    limit of connections, twice this, stays behind it)."""
    timeout_keep_alive_seconds: Seconds = 5.0
    """An idle keep-alive connection is closed after this long."""
    graceful_shutdown_seconds: Annotated[float, Strict(), Field(ge=0)] = 10.0
    """On SIGTERM, running requests get this long before they are cancelled (and billed for
    what they generated)."""


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


@dataclass(frozen=True, config=_FORBID)
class EmbeddingConfig:
    """The built-in embedding model ([embedding]): its own llama.cpp model, context and
    worker thread beside the chat engine's, answering /v1/embeddings."""

    enabled: Flag = True
    id: NonEmpty = DEFAULT_EMBEDDING_ID
    source: Text = DEFAULT_EMBEDDING_SOURCE
    """`pypi:all-minilm-l6-v2` (converted to GGUF at first start), or a GGUF path."""
    input_price: PriceUnits = 0.0
    """Currency units per million input tokens."""
    threads: NonNegative = 0
    """CPU threads of its llama.cpp context; 0 means one per core."""
    batch_size: Annotated[int, Strict(), Field(ge=64, le=65536)] = 512
    """Tokens encoded in one llama.cpp call (several requests' inputs together); an input
    may hold at most this many tokens, and at most the model's context. Every token of a
    call attends over the whole call (masked), so larger calls cost more per token: with
    all-MiniLM-L6-v2 and 64-token inputs on 2 cores, 256 and 512 encoded about 88 inputs/s,
    1024 74/s, 2048 21/s."""
    max_sequences: Annotated[int, Strict(), Field(ge=1, le=256)] = 64
    """Inputs encoded in one llama.cpp call."""
    max_waiting: Positive = 8192
    """Inputs allowed to wait for the model; past this the server answers 503."""
    truncatable: Flag = False
    """Whether `dimensions` below the model's own may be asked for (the vector's head,
    normalized again): only for models trained for it (Matryoshka); all-MiniLM-L6-v2 is
    not."""

    _prices = field_validator("input_price")(_price)


_BYTES = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """"4GiB", "512 MB", "1.5GiB" or "1000" as a number of bytes."""
    found = _BYTES.fullmatch(text)
    if found is None:
        raise ValueError(f"must be a number of bytes or text such as '4GiB', got {text!r}")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "").upper()])


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


_EXPECTED = {"int_type": "must be an integer", "int_from_float": "must be an integer",
             "int_parsing": "must be an integer", "float_type": "must be a number",
             "float_parsing": "must be a number", "bool_type": "must be true or false",
             "bool_parsing": "must be true or false", "string_type": "must be a string",
             "dataclass_type": "must be a table", "dataclass_exact_type": "must be a table",
             "dict_type": "must be a table", "tuple_type": "must be an array",
             "list_type": "must be an array", "path_type": "must be a string"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}


def describe(exc: ValidationError, raw: dict[str, Any],
             section: tuple[str, ...] = ()) -> str:
    """A pydantic error in the file's own terms: `engine.max_sequences must be >= 1`."""
    errors = exc.errors()
    # A list whose entries are wrong is not also "too short" (pydantic says both).
    errors = [e for e in errors if e["type"] != "too_short" or not any(
        len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])] == e["loc"] for o in errors)]
    return "; ".join(_describe_one(error, raw, section) for error in errors)


def _describe_one(error: ErrorDetails, raw: dict[str, Any], section: tuple[str, ...]) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    loc = section + error["loc"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown key in {_where(loc[:-1], raw) or 'config'}: {loc[-1]}"
    key = _where(loc, raw)
    if kind in _EXPECTED:
        text = f"{_EXPECTED[kind]}, got {error['input']!r}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        text = f"must be {_BOUNDS[kind]} {bound}"
    elif kind in ("missing", "missing_argument"):
        text = "is required"
    elif kind == "too_short" and loc[-1:] == ("deployments",):
        text = "needs at least one [[models.deployments]]"
    elif kind in ("too_short", "string_too_short"):
        text = "must not be empty"
    elif kind == "literal_error":
        text = f"must be one of {ctx['expected']}, got {error['input']!r}"
    elif kind == "value_error":
        text = str(ctx["error"])
    else:
        text = error["msg"]
    return f"{key} {text}" if key else text


def _where(loc: tuple[int | str, ...], raw: Any) -> str:
    """`("models", 0, "deployments", 1, "weight")` -> `models[0] (its id).deployments[1].weight`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            entry = raw[part] if isinstance(raw, list) and part < len(raw) else None
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
                text += f" ({entry['id']})"
            raw = entry
        else:
            text += f".{part}" if text else str(part)
            raw = raw.get(part) if isinstance(raw, dict) else None
    return text
