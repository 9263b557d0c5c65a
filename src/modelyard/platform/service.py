"""Putting the platform together from a Config: database, limiter, prices, the gate.

`prepare` runs before the server's event loop starts (and before each CLI command): it
migrates the database and, for `serve` on a database without an admin key, creates one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from modelyard.config import Config
from modelyard.errors import ModelyardError
from modelyard.platform.accounts import bootstrap_admin
from modelyard.platform.accounts_gate import AccountsGate
from modelyard.platform.database import Database, DatabaseError
from modelyard.platform.limits import Limiter, MemoryLimiter
from modelyard.platform.money import Price
from modelyard.platform.redis_limits import LimiterUnavailable, RedisLimiter


class PlatformUnavailable(ModelyardError, RuntimeError):
    """The database or Redis named in the config cannot be used; the message says why."""


def safe_url(url: str) -> str:
    """A URL fit for a message: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say nothing of it
        return "<the configured URL>"


def price_table(config: Config) -> dict[str, Price]:
    """Every priced model the server answers for, by id: the engine's model when it is
    listed under its own id, and the catalog's. Built once, held by the gate."""
    table: dict[str, Price] = {}
    if config.local_model and config.engine_model_listed:
        model = config.model
        table[model.id] = Price.from_units(model.input_price, model.output_price,
                                           model.cached_input_price)
    for entry in config.models:
        table[entry.id] = Price.from_units(entry.input_price, entry.output_price,
                                           entry.cached_input_price)
    if config.embedding.enabled:
        table[config.embedding.id] = Price.from_units(config.embedding.input_price, 0.0)
    return table


def open_database(config: Config) -> Database:
    try:
        return Database(config.platform_database_url)
    except DatabaseError as exc:
        raise PlatformUnavailable(str(exc)) from None


def limiter(config: Config) -> Limiter:
    if config.redis_url:
        return RedisLimiter(config.redis_url, config.platform.redis_prefix)
    return MemoryLimiter()


async def prepare(config: Config, *, create_admin: bool = False) -> str | None:
    """Migrate the database (and check Redis); the new admin key, if one was created."""
    db = open_database(config)
    try:
        await db.migrate()
        admin_key = await bootstrap_admin(db) if create_admin else None
    except (SQLAlchemyError, OSError) as exc:
        raise PlatformUnavailable(
            f"cannot use the database at {safe_url(db.url)}: {exc}") from None
    finally:
        await db.close()
    if config.redis_url:
        redis = RedisLimiter(config.redis_url, config.platform.redis_prefix)
        try:
            await redis.ping()
        except LimiterUnavailable as exc:
            raise PlatformUnavailable(
                f"cannot reach Redis at {safe_url(config.redis_url)}: {exc}") from None
        finally:
            await redis.close()
    return admin_key


def accounts_gate(config: Config, registry: CollectorRegistry | None = None) -> AccountsGate:
    """The gate for `modelyard serve`, with the config's price table (`price_table`). Its
    metrics go to `registry`."""
    return AccountsGate(open_database(config), limiter(config), price_table(config),
                        config.platform, registry)
