"""The gateway's own sections: keys, balances and limits ([platform]) and the HTTP
server's limits ([server])."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict
from pydantic.dataclasses import dataclass

from .base import _FORBID, NonEmpty, NonNegative, Positive, Seconds


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
