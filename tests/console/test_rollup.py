"""The console's daily usage sums: rolled and fresh records together always give what a
scan of every record gives, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from modelyard.console import rollup
from modelyard.platform.database import Database
from modelyard.platform.tables import usage, usage_daily, utcnow
from tests.platform.harness import Backend, with_db


def _record(when: datetime, account: str, key: str, model: str, rng: random.Random
            ) -> dict[str, Any]:
    return {"created_at": when, "key_id": key, "account_id": account, "model": model,
            "user": None, "prompt_tokens": rng.randint(1, 500),
            "cached_tokens": rng.randint(0, 1), "completion_tokens": rng.randint(1, 300),
            "reasoning_tokens": rng.randint(0, 3), "cost": rng.randint(0, 900),
            "reserved": 0, "latency_ms": 10.0, "ttft_ms": 1.0, "status": 200,
            "estimated": False, "client_disconnected": False, "uncollected": rng.randint(0, 1)}


def _scan(rows: list[dict[str, Any]], groups: tuple[str, ...], account: str | None,
          since: str, until: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    found: dict[tuple[str, ...], list[int]] = {}
    for row in rows:
        day = row["created_at"].date().isoformat()
        if (account is not None and row["account_id"] != account) or not since <= day <= until:
            continue
        key = tuple(day if name == "day" else row[name] for name in groups)
        sums = found.setdefault(key, [0] * 7)
        for index, name in enumerate(("requests", *rollup.SUMS)):
            sums[index] += 1 if name == "requests" else row[name]
    return {key: tuple(sums) for key, sums in found.items()}


def _rolled(connection: Connection) -> int:
    return int(connection.execute(select(func.sum(usage_daily.c.requests))).scalar_one())


def _read(totals: list[rollup.Totals], groups: tuple[str, ...]
          ) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {tuple(t.group[name] for name in groups): (
        t.requests, t.prompt_tokens, t.cached_tokens, t.completion_tokens,
        t.reasoning_tokens, t.cost, t.uncollected) for t in totals}


@pytest.mark.parametrize("seed", [7])
def test_rolled_and_fresh_records_sum_like_a_scan(backend: Backend, seed: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollup, "CHUNK", 37)  # several transactions a roll
    rng = random.Random(seed)
    now = utcnow()
    rows: list[dict[str, Any]] = []

    def add(count: int, newest_s: float, oldest_s: float) -> list[dict[str, Any]]:
        made = [_record(now - timedelta(seconds=rng.uniform(newest_s, oldest_s)),
                        rng.choice(["acct_a", "acct_b"]), rng.choice(["k1", "k2", "k3"]),
                        rng.choice(["m1", "m2"]), rng) for _ in range(count)]
        rows.extend(made)
        return made

    def write(connection: Connection, made: list[dict[str, Any]]) -> None:
        connection.execute(insert(usage), made)

    async def body(db: Database) -> None:
        await db.write(write, add(300, 120, 40 * 86400))  # old enough to roll
        await rollup.roll(db, force=True)
        assert await db.read(_rolled) == 300
        await db.write(write, add(100, 120, 3 * 86400))  # old, after the roll
        await db.write(write, add(50, 0, 30))  # within the grace: stays fresh
        await rollup.roll(db, force=True)
        await rollup.roll(db, force=True)  # nothing new: adds nothing twice
        await db.write(write, add(20, 0, 5))
        since = (now - timedelta(days=20)).date().isoformat()
        until = now.date().isoformat()
        for _ in range(2):  # the second time after a roll: no answer kept from before it
            for groups in (("day", "model"), ("key_id",), ("account_id",), ("model",)):
                for account in (None, "acct_a"):
                    got = await rollup.totals(db, groups, account_id=account, since=since,
                                              until=until)  # type: ignore[arg-type]
                    assert _read(got, groups) == _scan(rows, groups, account, since, until)
            await db.write(write, add(30, 120, 3 * 86400))
            await rollup.roll(db, force=True)
    with_db(backend.database_url, body)
