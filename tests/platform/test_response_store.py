"""Stored responses on SQLite and PostgreSQL: per account, read back as written, deleted
once, purged with the usage retention, capped in size."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from modelyard.platform import response_store
from modelyard.platform.database import Database
from modelyard.platform.response_store import (
    DatabaseResponses,
    MemoryResponses,
    ResponseStore,
    StoredResponse,
)
from modelyard.platform.tables import utcnow

INPUT = [{"type": "message", "role": "user",
          "content": [{"type": "input_text", "text": "héllo \x00 \u2028 😀"}]}]
BODY = {"id": "resp_1", "object": "response", "status": "completed",
        "output": [{"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
        "metadata": {"k": "v"}}


def _record(response_id: str = "resp_1", account: str = "acct-a") -> StoredResponse:
    return StoredResponse(response_id, account, INPUT, {**BODY, "id": response_id})


async def _exercise(store: ResponseStore) -> None:
    await store.save(_record())
    loaded = await store.load("acct-a", "resp_1")
    assert loaded == _record()
    # another account, or an unknown id: as if it did not exist
    assert await store.load("acct-b", "resp_1") is None
    assert await store.load("acct-a", "resp_2") is None
    assert not await store.delete("acct-b", "resp_1")
    assert await store.load("acct-a", "resp_1") is not None
    assert await store.delete("acct-a", "resp_1")
    assert not await store.delete("acct-a", "resp_1")
    assert await store.load("acct-a", "resp_1") is None


def test_database_store(db_url: str) -> None:
    async def run() -> None:
        db = Database(db_url)
        try:
            await db.migrate()
            await _exercise(DatabaseResponses(db))
        finally:
            await db.close()
    asyncio.run(run())


def test_memory_store() -> None:
    asyncio.run(_exercise(MemoryResponses()))


def test_memory_store_keeps_the_newest() -> None:
    async def run() -> None:
        store = MemoryResponses(capacity=2)
        for index in range(3):
            await store.save(_record(f"resp_{index}"))
        assert await store.load("acct-a", "resp_0") is None
        assert await store.load("acct-a", "resp_2") is not None
    asyncio.run(run())


def test_purge_deletes_what_is_past_retention(db_url: str) -> None:
    async def run() -> None:
        db = Database(db_url)
        try:
            await db.migrate()
            store = DatabaseResponses(db)
            await store.save(_record("resp_old"))
            assert await response_store.purge(db, utcnow() - timedelta(days=1)) == 0
            assert await response_store.purge(db, utcnow() + timedelta(seconds=1)) == 1
            assert await store.load("acct-a", "resp_old") is None
        finally:
            await db.close()
    asyncio.run(run())


@pytest.mark.parametrize("store", [MemoryResponses()])
def test_size_cap(store: ResponseStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(response_store, "MAX_STORED_BYTES", 1000)
    big = StoredResponse("resp_big", "acct-a", [{"text": "x" * 2000}], BODY)
    with pytest.raises(ValueError, match="at most 1000 bytes"):
        asyncio.run(store.save(big))
