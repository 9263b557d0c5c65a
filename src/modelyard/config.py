"""One typed configuration: defaults, then a TOML file, then environment, then CLI flags.

Every value is validated when the server starts, and a bad one raises `ConfigError`
naming the key, so a typo never surfaces later as a stack trace.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

from modelyard.platform.money import AmountError, Price

DEFAULT_MODEL_ID = "qwen2.5-coder-0.5b-instruct"
DEFAULT_MODEL_SOURCE = "pypi:qwen2.5-coder-0.5b-instruct"


_SECTIONS = ("model", "engine", "platform", "router", "server")
PROFILES = ("vllm", "sglang", "llamacpp", "ollama", "openai", "passthrough")
"""How SPEC.md's parameters reach a family of upstream servers (providers/profiles.py)."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class EngineConfig:
    """How the built-in engine uses the machine."""

    max_sequences: int = 16
    """Sequences decoded together in one llama.cpp context (slots). 16 gave the most
    tokens/s in benchmarks/bench_serving.py on 2 cores; fewer gives lower per-token latency."""
    context_per_sequence: int = 4096
    """Tokens of KV cache each sequence may use (prompt + completion)."""
    step_token_budget: int = 512
    """Tokens fed to one `llama_decode` call: decode tokens first, prefill chunks fill the rest."""
    max_waiting: int = 256
    """Requests allowed to wait for a slot; past this the server answers 503."""
    threads: int = 0
    """CPU threads for llama.cpp; 0 means one per core."""
    gpu_layers: int = 0
    """Layers offloaded to a GPU when llama.cpp was built for one."""
    flash_attention: bool = True
    """Flash attention in llama.cpp; on the CPU it is faster at every batch size we measured."""
    prefix_caching: bool = True
    """Reuse the KV cells of a finished sequence's prompt prefix for a new request."""
    share_prefix_cache: bool = False
    """Reuse cached prompt prefixes across accounts (one-tenant deployments). Off, each
    account reuses only its own, so no account can probe another's prompts."""


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a sampling field out gets; the request overrides each
    field on its own. The built-in values are OpenAI's (the providers in SPEC.md often use,
    e.g., temperature 0.7, top_p 0.7, top_k 50: set them per model)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """One model the server answers for."""

    id: str = DEFAULT_MODEL_ID
    source: str = DEFAULT_MODEL_SOURCE
    default_max_tokens: int | None = None
    """Completion cap when a request names none; None means what the context leaves."""
    input_price: float = 0.0
    """Currency units per million prompt tokens."""
    cached_input_price: float | None = None
    """Per million prompt tokens served from the prefix cache; None: the input price."""
    output_price: float = 0.0
    """Currency units per million completion tokens."""
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    """[model.defaults] in the config file."""
    chat_template: str | None = None
    """Path to a Jinja chat template that replaces the one stored in the GGUF."""


@dataclass(frozen=True)
class PlatformConfig:
    """Keys, balances and limits (the database and Redis are chosen at the top level)."""

    reservation_ttl_seconds: float = 60.0
    """How long a reservation outlives its gateway: a running gateway keeps extending its
    own; one left by a crashed gateway is released this long after its last extension."""
    sweep_interval_seconds: float = 10.0
    """How often expired reservations are looked for (and once at start)."""
    usage_retention_days: int = 365
    """Usage records older than this are deleted; 0 keeps them forever."""
    key_cache_seconds: float = 0.0
    """Remember a looked-up key this long; 0 (the default) reads it on every request, so a
    revocation is effective at once on every gateway."""
    redis_prefix: str = "modelyard"
    """Prefix of every Redis key modelyard writes."""
    max_concurrent_per_key: int = 64
    """Requests of one API key in flight at once (a 429 beyond); 0: no limit."""
    max_concurrent_per_account: int = 128
    """Requests of all the keys of one account in flight at once (a 429 beyond); 0: none."""
    max_request_tokens: int = 32768
    """The most completion tokens a request with several choices may ask for in all
    (n x max_tokens; a 422 beyond); a single choice is bounded by the model's context."""


@dataclass(frozen=True)
class RouterConfig:
    """How requests are spread over a catalog model's deployments ([router])."""

    max_attempts: int = 3
    """Deployments tried for one request (retries go to another deployment, and only
    before the first byte reached the client)."""
    breaker_failures: int = 5
    """Consecutive failures or timeouts that open a deployment's circuit breaker."""
    breaker_cooldown_seconds: float = 30.0
    """How long an open breaker waits before one half-open probe request."""
    usage_drain_seconds: float = 10.0
    """After a client went away, how long to keep reading an upstream for its usage."""


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server's own limits ([server])."""

    max_body_bytes: int = 0
    """The largest request body read (a 413 beyond); 0: derived from the largest context
    served (16 bytes per token plus 1 MiB, at least 1 MiB)."""
    body_timeout_seconds: float = 30.0
    """A request body must arrive within this long (a 408 beyond)."""
    prepare_concurrency: int = 4
    """Requests prepared at once (prompt rendering, tokenizing, grammar compilation), off
    the event loop."""
    prepare_timeout_seconds: float = 10.0
    """A request whose preparation takes longer is refused (422); waiting longer for a
    preparation slot is a 503."""
    limit_concurrency: int = 2048
    """Connections and requests the server takes at once; past it uvicorn answers 503."""
    timeout_keep_alive_seconds: float = 5.0
    """An idle keep-alive connection is closed after this long."""
    graceful_shutdown_seconds: float = 10.0
    """On SIGTERM, running requests get this long before they are cancelled (and billed for
    what they generated)."""


@dataclass(frozen=True)
class DeploymentConfig:
    """One place a catalog model runs ([[models.deployments]])."""

    kind: str = "openai"
    """"openai": an OpenAI-compatible server; "local": the built-in engine."""
    base_url: str = ""
    """The upstream's API root, e.g. http://10.0.0.5:8000/v1."""
    api_key_env: str | None = None
    """Name of the environment variable holding the upstream's key (never the key)."""
    upstream_model: str | None = None
    """The model name the upstream knows; None: the catalog id."""
    profile: str = "openai"
    weight: float = 1.0
    max_concurrency: int = 64
    connect_timeout: float = 5.0
    first_token_timeout: float = 60.0
    """A stream's first event must come within it, and no silence after may last longer."""
    total_timeout: float = 600.0
    """The whole answer's limit (a stream's is checked between events)."""
    name: str | None = None
    """Shown in logs and metrics; None: derived from base_url and upstream_model."""


@dataclass(frozen=True)
class CatalogModelConfig:
    """One catalog model ([[models]]) and its deployments."""

    id: str
    deployments: tuple[DeploymentConfig, ...]
    input_price: float = 0.0
    cached_input_price: float | None = None
    output_price: float = 0.0
    context_length: int = 32768
    default_max_tokens: int | None = None
    defaults: dict[str, float] = field(default_factory=dict)
    """Sampling parameters sent when a request leaves them out (only those given)."""
    capabilities: tuple[str, ...] = ()
    """Any of tools, json_schema, reasoning, vision (shown in /v1/models)."""
    drop_unsupported_params: bool = False
    """With the openai profile: drop parameters OpenAI lacks instead of answering 422."""


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=lambda: Path(platformdirs.user_data_dir("modelyard")))
    log_level: str = "info"
    database_url: str | None = None
    """SQLAlchemy URL of the platform's database; None: SQLite in the data directory."""
    redis_url: str | None = None
    """Redis for rate limits shared by several gateways; None: limits in this process."""
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    models: tuple[CatalogModelConfig, ...] = ()
    """The catalog ([[models]]), besides the built-in engine's [model]."""
    local_model: bool = True
    """Run the built-in engine: true unless the file has [[models]] only and none of them
    has a local deployment."""
    engine_model_listed: bool = True
    """Serve the engine's model under its own id ([model]): false when the file has
    [[models]] and no [model] table (the engine then answers only as a catalog model's
    local deployment, at that model's prices)."""

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def platform_database_url(self) -> str:
        """The database the platform uses: `database_url`, or SQLite in the data dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'modelyard.db'}"


_OPTIONAL: dict[str, type] = {"default_max_tokens": int, "cached_input_price": float,
                               "chat_template": str}
"""Fields whose default is None, and the type a given value must have."""


def _build(cls: type[Any], values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    default = cls()
    for name, value in values.items():
        if name == "defaults":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.defaults must be a table")
            kwargs[name] = _build(SamplingDefaults, value, f"{where}.defaults")
            continue
        expected = _OPTIONAL.get(name) or type(getattr(default, name))
        if expected is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}.{name} must be true or false, got {value!r}")
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{name} must be an integer, got {value!r}")
        if expected is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"{where}.{name} must be a number, got {value!r}")
        if expected is float:
            value = float(value)
        if expected is str and not isinstance(value, str):
            raise ConfigError(f"{where}.{name} must be a string, got {value!r}")
        kwargs[name] = value
    return replace(default, **kwargs)


def _validate(config: Config) -> Config:
    engine = config.engine
    platform = config.platform
    checks: list[tuple[bool, str]] = [
        (1 <= engine.max_sequences <= 256, "engine.max_sequences must be between 1 and 256"),
        (engine.context_per_sequence >= 64, "engine.context_per_sequence must be at least 64"),
        (engine.step_token_budget >= engine.max_sequences,
         "engine.step_token_budget must be at least engine.max_sequences"),
        (engine.max_waiting >= 0, "engine.max_waiting must be >= 0"),
        (engine.threads >= 0, "engine.threads must be >= 0"),
        (engine.gpu_layers >= 0, "engine.gpu_layers must be >= 0"),
        (0 < config.port < 65536 or config.port == 0, "port must be between 0 and 65535"),
        (bool(config.model.id), "model.id must not be empty"),
        (config.model.default_max_tokens is None or config.model.default_max_tokens >= 1,
         "model.default_max_tokens must be >= 1"),
    ]
    d = config.model.defaults
    checks += [
        (0 <= d.temperature <= 2, "model.defaults.temperature must be between 0 and 2"),
        (0 < d.top_p <= 1, "model.defaults.top_p must be in (0, 1]"),
        (d.top_k >= -1, "model.defaults.top_k must be >= -1"),
        (0 <= d.min_p <= 1, "model.defaults.min_p must be between 0 and 1"),
        (-2 <= d.frequency_penalty <= 2, "model.defaults.frequency_penalty must be in [-2, 2]"),
        (-2 <= d.presence_penalty <= 2, "model.defaults.presence_penalty must be in [-2, 2]"),
        (0 < d.repetition_penalty <= 2, "model.defaults.repetition_penalty must be in (0, 2]"),
    ]
    checks += [
        (platform.reservation_ttl_seconds > 0, "platform.reservation_ttl_seconds must be > 0"),
        (platform.sweep_interval_seconds > 0, "platform.sweep_interval_seconds must be > 0"),
        (platform.usage_retention_days >= 0, "platform.usage_retention_days must be >= 0"),
        (platform.key_cache_seconds >= 0, "platform.key_cache_seconds must be >= 0"),
        (bool(platform.redis_prefix), "platform.redis_prefix must not be empty"),
        (platform.max_concurrent_per_key >= 0, "platform.max_concurrent_per_key must be >= 0"),
        (platform.max_concurrent_per_account >= 0,
         "platform.max_concurrent_per_account must be >= 0"),
        (platform.max_request_tokens >= 1, "platform.max_request_tokens must be >= 1"),
    ]
    s = config.server
    checks += [
        (s.max_body_bytes >= 0, "server.max_body_bytes must be >= 0"),
        (s.body_timeout_seconds > 0, "server.body_timeout_seconds must be > 0"),
        (s.prepare_concurrency >= 1, "server.prepare_concurrency must be >= 1"),
        (s.prepare_timeout_seconds > 0, "server.prepare_timeout_seconds must be > 0"),
        (s.limit_concurrency >= 1, "server.limit_concurrency must be >= 1"),
        (s.timeout_keep_alive_seconds > 0, "server.timeout_keep_alive_seconds must be > 0"),
        (s.graceful_shutdown_seconds >= 0, "server.graceful_shutdown_seconds must be >= 0"),
    ]
    r = config.router
    checks += [
        (r.max_attempts >= 1, "router.max_attempts must be >= 1"),
        (r.breaker_failures >= 1, "router.breaker_failures must be >= 1"),
        (r.breaker_cooldown_seconds > 0, "router.breaker_cooldown_seconds must be > 0"),
        (r.usage_drain_seconds >= 0, "router.usage_drain_seconds must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    model = config.model
    try:
        Price.from_units(model.input_price, model.output_price, model.cached_input_price)
    except AmountError as exc:
        raise ConfigError(f"model.{exc}") from None
    return config


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Defaults, overlaid by the TOML file at `path`, overlaid by `MODELYARD_*` variables."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    top = {k: v for k, v in raw.items() if k not in _SECTIONS}
    for section in _SECTIONS:
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{section} must be a table ([{section}]), got {raw[section]!r}")
    if "data_dir" in top and not isinstance(top["data_dir"], str):
        raise ConfigError("data_dir must be a string")
    if "data_dir" in top:
        top["data_dir"] = Path(str(top["data_dir"])).expanduser()
    config = Config()
    for key in ("host", "log_level", "database_url", "redis_url"):
        if key in top and not isinstance(top[key], str):
            raise ConfigError(f"{key} must be a string")
    if "port" in top and (isinstance(top["port"], bool) or not isinstance(top["port"], int)):
        raise ConfigError("port must be an integer")
    unknown = sorted(set(top) - {"host", "port", "data_dir", "log_level", "database_url",
                                 "redis_url", "models"})
    if unknown:
        raise ConfigError(f"unknown key(s) in config: {', '.join(unknown)}")
    config = replace(config, **top)
    if "model" in raw:
        config = replace(config, model=_build(ModelConfig, dict(raw["model"]), "model"))
    if "engine" in raw:
        config = replace(config, engine=_build(EngineConfig, dict(raw["engine"]), "engine"))
    if "platform" in raw:
        config = replace(config, platform=_build(PlatformConfig, dict(raw["platform"]),
                                                 "platform"))
    if "router" in raw:
        config = replace(config, router=_build(RouterConfig, dict(raw["router"]), "router"))
    if "server" in raw:
        config = replace(config, server=_build(ServerConfig, dict(raw["server"]), "server"))
    if "models" in raw:
        if not isinstance(raw["models"], list):
            raise ConfigError("models must be an array of tables ([[models]])")
        catalog = tuple(_catalog_model(entry, i, env) for i, entry in enumerate(raw["models"]))
        ids = [config.model.id] + [m.id for m in catalog]
        for model in catalog:
            if ids.count(model.id) > 1:
                raise ConfigError(f"models: the id {model.id!r} is used more than once")
        local = "model" in raw or any(
            d.kind == "local" for m in catalog for d in m.deployments)
        config = replace(config, models=catalog, local_model=local,
                         engine_model_listed="model" in raw)
    if env.get("MODELYARD_DATA_DIR"):
        config = replace(config, data_dir=Path(env["MODELYARD_DATA_DIR"]).expanduser())
    if env.get("MODELYARD_DATABASE_URL"):
        config = replace(config, database_url=env["MODELYARD_DATABASE_URL"])
    if env.get("MODELYARD_REDIS_URL"):
        config = replace(config, redis_url=env["MODELYARD_REDIS_URL"])
    return _validate(config)


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Apply command-line flags (None means not given) on top of a loaded config."""
    top = {k: v for k, v in overrides.items() if v is not None and k in ("host", "port")}
    config = replace(config, **top)
    if overrides.get("model") is not None:
        source = str(overrides["model"])
        model = replace(config.model, source=source)
        if overrides.get("model_id") is None and source != DEFAULT_MODEL_SOURCE:
            model = replace(model, id=_id_from_source(source))
        config = replace(config, model=model)
    if overrides.get("model_id") is not None:
        config = replace(config, model=replace(config.model, id=str(overrides["model_id"])))
    return _validate(config)


def _id_from_source(source: str) -> str:
    name = source.removeprefix("pypi:").rsplit("/", 1)[-1]
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


_DEPLOYMENT_TYPES: dict[str, type] = {
    "kind": str, "base_url": str, "api_key_env": str, "upstream_model": str, "profile": str,
    "weight": float, "max_concurrency": int, "connect_timeout": float,
    "first_token_timeout": float, "total_timeout": float, "name": str}
_MODEL_TYPES: dict[str, type] = {
    "id": str, "input_price": float, "cached_input_price": float, "output_price": float,
    "context_length": int, "default_max_tokens": int, "drop_unsupported_params": bool}
_SAMPLING = {f.name for f in fields(SamplingDefaults)}
_CAPABILITIES = ("tools", "json_schema", "reasoning", "vision")


def _typed(values: dict[str, Any], types: dict[str, type], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        expected = types.get(name)
        if expected is None:
            raise ConfigError(f"unknown key in {where}: {name}")
        ok = {bool: isinstance(value, bool),
              int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, int | float) and not isinstance(value, bool),
              str: isinstance(value, str)}[expected]
        if not ok:
            raise ConfigError(f"{where}.{name} must be of type {expected.__name__}, "
                              f"got {value!r}")
        out[name] = float(value) if expected is float else value
    return out


def _catalog_model(entry: Any, i: int, env: Any) -> CatalogModelConfig:
    where = f"models[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table")
    values = dict(entry)
    if not isinstance(values.get("id"), str) or not values["id"]:
        raise ConfigError(f"{where}.id must be a non-empty string")
    where = f"models[{i}] ({values['id']})"
    raw_deployments = values.pop("deployments", None)
    raw_defaults = values.pop("defaults", {})
    raw_capabilities = values.pop("capabilities", [])
    model_values = _typed(values, _MODEL_TYPES, where)
    if not isinstance(raw_deployments, list) or not raw_deployments:
        raise ConfigError(f"{where} needs at least one [[models.deployments]]")
    deployments = tuple(_deployment(d, f"{where}.deployments[{j}]", env)
                        for j, d in enumerate(raw_deployments))
    if sum(d.kind == "local" for d in deployments) > 1:
        raise ConfigError(f"{where}: at most one local deployment (there is one engine)")
    if not isinstance(raw_defaults, dict):
        raise ConfigError(f"{where}.defaults must be a table")
    unknown = sorted(set(raw_defaults) - _SAMPLING)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}.defaults: {', '.join(unknown)}")
    defaults = _typed(raw_defaults, {name: float for name in _SAMPLING}, f"{where}.defaults")
    if not isinstance(raw_capabilities, list) or any(
            c not in _CAPABILITIES for c in raw_capabilities):
        raise ConfigError(f"{where}.capabilities must be a list of {', '.join(_CAPABILITIES)}")
    model = CatalogModelConfig(deployments=deployments, defaults=defaults,
                               capabilities=tuple(raw_capabilities), **model_values)
    if model.context_length < 16:
        raise ConfigError(f"{where}.context_length must be at least 16")
    if model.default_max_tokens is not None and model.default_max_tokens < 1:
        raise ConfigError(f"{where}.default_max_tokens must be >= 1")
    try:
        Price.from_units(model.input_price, model.output_price, model.cached_input_price)
    except AmountError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return model


def _deployment(entry: Any, where: str, env: Any) -> DeploymentConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table")
    deployment = DeploymentConfig(**_typed(dict(entry), _DEPLOYMENT_TYPES, where))
    if deployment.kind not in ("openai", "local"):
        raise ConfigError(f"{where}.kind must be \"openai\" or \"local\", "
                          f"got {deployment.kind!r}")
    if deployment.kind == "local":
        return deployment
    if not deployment.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.base_url must be an http:// or https:// URL")
    if deployment.profile not in PROFILES:
        raise ConfigError(f"{where}.profile must be one of {', '.join(PROFILES)}, "
                          f"got {deployment.profile!r}")
    if deployment.api_key_env is not None:
        if not _ENV_NAME.fullmatch(deployment.api_key_env):
            raise ConfigError(f"{where}.api_key_env must name an environment variable "
                              "(the key itself never goes in the file)")
        if not env.get(deployment.api_key_env):
            raise ConfigError(f"{where}.api_key_env: the environment variable "
                              f"{deployment.api_key_env} is not set")
    checks = [(deployment.weight > 0, "weight must be > 0"),
              (deployment.max_concurrency >= 1, "max_concurrency must be >= 1"),
              (deployment.connect_timeout > 0, "connect_timeout must be > 0"),
              (deployment.first_token_timeout > 0, "first_token_timeout must be > 0"),
              (deployment.total_timeout > 0, "total_timeout must be > 0")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}.{message}")
    return deployment
