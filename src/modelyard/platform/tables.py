"""The platform's tables (SQLAlchemy Core). Migrations in `migrations/` create them.

Money columns are integer micro-units. Times are naive UTC. An account's `balance` is
what it has after every settled request; `reserved` is the part of it held by requests
still running (one `reservations` row each), so `balance - reserved` is what a new request
may reserve. `credited` and `spent` are running totals, so that at any time
`balance == credited - spent`, whatever the usage retention has trimmed.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData()

ROW_ID = BigInteger().with_variant(Integer, "sqlite")
"""An auto-incrementing id: SQLite only auto-increments an INTEGER PRIMARY KEY."""


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def storable(value: str, max_length: int, *, control: bool = False) -> bool:
    """Whether a text column of `max_length` holds `value` on every database: no NUL
    (PostgreSQL refuses it), no lone surrogate (not UTF-8), and with `control`, no other
    control character either."""
    if len(value) > max_length:
        return False
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs" or char == "\x00" or (control and category == "Cc"):
            return False
    return True


accounts = Table(
    "accounts", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("balance", BigInteger, nullable=False, server_default="0"),
    Column("reserved", BigInteger, nullable=False, server_default="0"),
    Column("credited", BigInteger, nullable=False, server_default="0"),
    Column("spent", BigInteger, nullable=False, server_default="0"),
    Column("created_at", DateTime, nullable=False),
    Column("weight", Float),  # its fair share of the engines; None: 1 (migration 0006)
    CheckConstraint("reserved >= 0 AND reserved <= balance", name="ck_accounts_reserved"),
)

credits = Table(
    "credits", metadata,
    Column("id", ROW_ID, primary_key=True, autoincrement=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),
    Column("note", String(200), nullable=False),
    Column("created_at", DateTime, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(12), primary_key=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("digest", String(64), nullable=False),
    Column("name", String(200)),
    Column("is_admin", Boolean, nullable=False, server_default=false()),
    Column("models", Text),
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_concurrent", Integer),  # requests in flight; None: the configured default
    Column("priority", Integer),  # among its account's requests; None: 0 (migration 0006)
    Column("expires_at", DateTime),
    Column("revoked_at", DateTime),
    Column("created_at", DateTime, nullable=False),
)

reservations = Table(
    "reservations", metadata,
    Column("id", String(32), primary_key=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False),
    Column("key_id", String(12), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("expires_at", DateTime, nullable=False, index=True),
    Column("created_at", DateTime, nullable=False),
)

usage = Table(
    "usage", metadata,
    Column("id", ROW_ID, primary_key=True, autoincrement=True),
    Column("created_at", DateTime, nullable=False, index=True),
    Column("key_id", String(12), nullable=False, index=True),
    Column("account_id", String(32), nullable=False, index=True),
    Column("model", String(200), nullable=False),
    Column("user", String(256)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("reasoning_tokens", Integer, nullable=False),
    Column("cost", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("status", Integer, nullable=False),
    Column("estimated", Boolean, nullable=False),
    Column("client_disconnected", Boolean, nullable=False),
    # One per settlement, so that a retried settlement never charges twice.
    Column("settlement_id", String(32), index=True, unique=True),
    # Cost the account could not cover (micro-units); `cost` is what was charged.
    Column("uncollected", BigInteger, nullable=False, server_default="0"),
    # Written without optional fields (such as `user`) that the database would refuse.
    Column("degraded", Boolean, nullable=False, server_default=false()),
)

responses = Table(
    "responses", metadata,
    Column("id", String(64), primary_key=True),
    # The account whose key created it: only that account reads, continues or deletes it.
    Column("account_id", String(32), nullable=False),
    Column("created_at", DateTime, nullable=False, index=True),
    Column("input", Text, nullable=False),  # JSON: the conversation's input items
    Column("body", Text, nullable=False),  # JSON: the response as it was answered
)
"""Responses kept by `POST /v1/responses` (`store: true`)."""

# An account's records newest first (the console's request log), migration 0005.
Index("ix_usage_account_id_id", usage.c.account_id, usage.c.id)

console_sessions = Table(
    "console_sessions", metadata,
    # The SHA-256 of the session cookie's value: the database never holds a usable cookie.
    Column("id", String(64), primary_key=True),
    # The key signed in with: the session lasts while the key does (checked each request).
    Column("key_id", String(12), nullable=False, index=True),
    Column("account_id", String(32), nullable=False),
    Column("csrf", String(64), nullable=False),  # the session's CSRF token
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False, index=True),
)
"""Signed-in sessions of the web console (modelyard/console)."""

usage_daily = Table(
    "usage_daily", metadata,
    Column("account_id", String(32), primary_key=True),
    Column("day", String(10), primary_key=True, index=True),  # YYYY-MM-DD, UTC
    Column("model", String(200), primary_key=True),
    Column("key_id", String(12), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("cost", BigInteger, nullable=False),
    Column("uncollected", BigInteger, nullable=False),
)
"""Usage records summed per account, day, model and key, up to `usage_rollup.last_id`
(console/rollup.py): the console's totals read these instead of every record."""

usage_rollup = Table(
    "usage_rollup", metadata,
    Column("id", Integer, primary_key=True),  # one row, id 1
    Column("last_id", BigInteger, nullable=False),  # usage records up to it are in usage_daily
)
