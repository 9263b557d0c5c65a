"""Stored responses of the Responses API, per account: the conversation's input items and
the response as it was answered (both JSON), so that `previous_response_id` continues it,
`GET /v1/responses/{id}` reads it and `DELETE` removes it.

An id belongs to the account that created it: looked up with any other account (or none)
it does not exist. Records older than the usage retention are deleted with the usage
records (`purge`). `DatabaseResponses` keeps them in the platform database;
`MemoryResponses` (the open gate's, without a database) keeps the newest few in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from modelyard.platform.database import Database
from modelyard.platform.tables import responses, utcnow

MAX_STORED_BYTES = 32 * 1024 * 1024
"""The most a stored response (its input and body as JSON) may take."""


@dataclass(frozen=True)
class StoredResponse:
    id: str
    account_id: str
    input: list[dict[str, Any]]
    """The conversation's input items (a previous response's items first)."""
    body: dict[str, Any]
    """The response object as answered (its `output` items, instructions, usage ...)."""


class ResponseStore(Protocol):
    async def save(self, record: StoredResponse) -> None: ...

    async def load(self, account_id: str, response_id: str) -> StoredResponse | None:
        """The account's response, or None (unknown, or another account's)."""
        ...

    async def delete(self, account_id: str, response_id: str) -> bool:
        """Whether the account's response existed (and is now gone)."""
        ...


def encode(record: StoredResponse) -> tuple[str, str]:
    """The record's JSON columns; a ValueError past MAX_STORED_BYTES."""
    data, body = orjson.dumps(record.input), orjson.dumps(record.body)
    if len(data) + len(body) > MAX_STORED_BYTES:
        raise ValueError(f"a stored response takes at most {MAX_STORED_BYTES} bytes")
    return data.decode(), body.decode()


class DatabaseResponses:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def save(self, record: StoredResponse) -> None:
        data, body = encode(record)
        await self.db.write(_save, record.id, record.account_id, data, body)

    async def load(self, account_id: str, response_id: str) -> StoredResponse | None:
        row = await self.db.read(_load, account_id, response_id)
        if row is None:
            return None
        return StoredResponse(response_id, account_id, orjson.loads(row[0]),
                              orjson.loads(row[1]))

    async def delete(self, account_id: str, response_id: str) -> bool:
        return await self.db.write(_delete, account_id, response_id)


def _save(connection: Connection, response_id: str, account_id: str, data: str,
          body: str) -> None:
    connection.execute(insert(responses).values(id=response_id, account_id=account_id,
                                                created_at=utcnow(), input=data, body=body))


def _load(connection: Connection, account_id: str, response_id: str) -> tuple[str, str] | None:
    row = connection.execute(select(responses.c.input, responses.c.body).where(
        responses.c.id == response_id, responses.c.account_id == account_id)).first()
    return None if row is None else (row[0], row[1])


def _delete(connection: Connection, account_id: str, response_id: str) -> bool:
    return bool(connection.execute(delete(responses).where(
        responses.c.id == response_id, responses.c.account_id == account_id)).rowcount)


def _purge(connection: Connection, before: datetime) -> int:
    return int(connection.execute(
        delete(responses).where(responses.c.created_at < before)).rowcount)


async def purge(db: Database, before: datetime) -> int:
    """Delete stored responses older than `before` (the usage retention)."""
    return await db.write(_purge, before)


class MemoryResponses:
    """The newest `capacity` responses in memory (a server without a database)."""

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self._records: OrderedDict[tuple[str, str], StoredResponse] = OrderedDict()

    async def save(self, record: StoredResponse) -> None:
        encode(record)  # the same cap as the database's
        self._records[(record.account_id, record.id)] = record
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    async def load(self, account_id: str, response_id: str) -> StoredResponse | None:
        return self._records.get((account_id, response_id))

    async def delete(self, account_id: str, response_id: str) -> bool:
        return self._records.pop((account_id, response_id), None) is not None
