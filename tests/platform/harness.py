"""The real app with the accounts gate in front of the fake model, driven in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from prometheus_client import CollectorRegistry

from modelyard.api.app import create_app
from modelyard.api.state import AppState
from modelyard.config import PlatformConfig
from modelyard.platform import accounts as ops
from modelyard.platform.accounts_gate import AccountsGate
from modelyard.platform.database import Database
from modelyard.platform.limits import Limiter, MemoryLimiter
from modelyard.platform.money import Price
from modelyard.platform.redis_limits import RedisLimiter
from tests.platform.fakes import FakeProvider
from tests.platform.services import REDIS_URL

PRICE = Price(input=1_000_000, cached_input=1_000_000, output=2_000_000)
"""1 micro-unit per prompt token, 2 per completion token."""


@dataclass(frozen=True)
class Backend:
    database_url: str
    redis_prefix: str | None = None

    def limiter(self) -> Limiter:
        if self.redis_prefix is None:
            return MemoryLimiter()
        return RedisLimiter(REDIS_URL, self.redis_prefix)


@dataclass
class Harness:
    state: AppState
    gate: AccountsGate
    provider: FakeProvider
    client: httpx.AsyncClient
    admin_key: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db(self) -> Database:
        return self.gate.db

    async def key(self, account: str, balance: int | None = None, **options: Any) -> str:
        if balance is not None:
            await ops.create_account(self.db, account, balance)
        return (await ops.create_key(self.db, account, **options)).text

    async def chat(self, key: str | None, *, model: str = "fake", max_tokens: int = 4,
                   content: str = "one two three", **body: Any) -> httpx.Response:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return await self.client.post("/v1/chat/completions", headers=headers, json={
            "model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, **body})

    async def settled(self) -> None:
        await self.state.drain()

    async def db_account(self, name: str) -> tuple[int, int]:
        """The account's balance and reserved amount."""
        account = await ops.get_account(self.db, name)
        return account.balance, account.reserved


@asynccontextmanager
async def harness(backend: Backend, *, price: Price = PRICE, delay_s: float = 0.0,
                  answer_tokens: int | None = None, settings: PlatformConfig | None = None,
                  start: bool = False) -> AsyncIterator[Harness]:
    setup = Database(backend.database_url)
    try:
        await setup.migrate()
        admin_key = await ops.bootstrap_admin(setup)
    finally:
        await setup.close()
    provider = FakeProvider(delay_s=delay_s, answer_tokens=answer_tokens)
    registry = CollectorRegistry()
    gate = AccountsGate(Database(backend.database_url), backend.limiter(), {"fake": price},
                        settings or PlatformConfig(), registry)
    state = AppState(providers={"fake": provider}, registry=registry, gate=gate)
    app = create_app(state)
    if start:
        await gate.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://testserver") as client:
            yield Harness(state, gate, provider, client, admin_key or "")
    finally:
        await state.drain()
        await gate.close()


def scenario(backend: Backend, body: Callable[[Harness], Awaitable[None]],
             **options: object) -> None:
    """Run `body(platform)` on a fresh harness (the options as for `harness`)."""
    async def main() -> None:
        async with harness(backend, **options) as platform:  # type: ignore[arg-type]
            await body(platform)
    asyncio.run(main())


T = TypeVar("T")


def with_db(url: str, body: Callable[[Database], Awaitable[T]]) -> T:
    """Run `body(db)` on a migrated platform database at `url`, closed afterwards."""
    async def main() -> T:
        db = Database(url)
        try:
            await db.migrate()
            return await body(db)
        finally:
            await db.close()
    return asyncio.run(main())


def chat_scope(key: str) -> dict[str, Any]:
    """The ASGI scope of `POST /v1/chat/completions` with `key`, for tests that drive the
    app at the ASGI level (to send a body slowly or leave mid-answer)."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "server": ("testserver", 80),
        "client": ("127.0.0.1", 5000),
        "headers": [(b"authorization", f"Bearer {key}".encode()),
                    (b"content-type", b"application/json")]}
