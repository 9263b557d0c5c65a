"""Console benchmark: how long the console's pages take to render over a large ledger.

The platform database is filled with 100,000 usage records (bulk inserts, in time order
as a live ledger grows): 40 accounts whose traffic follows a Zipf-like spread (the
busiest holds over a quarter of the records), one to six keys each, eight models with
their own prices, token counts and latencies, over the last 90 days with a daily rhythm.
Then the overview, usage and log pages are rendered through the real app
(`modelyard.api.app.create_app`, in process through its ASGI interface, signed in with a
console session as a browser is) many times each, for the busiest account and for the
operator, and the p50 / p99 of each page is printed beside the 50 ms target.

Two floors are timed beside them in the same run: the stylesheet (no database) and the
models page (the session lookup only). Both databases are measured, one after the other:
SQLite (a file in a temporary directory, as `modelyard serve` keeps it) and PostgreSQL (a
database of its own, created and dropped by the run; `--postgres-url` names the server,
default the local standard port). PostgreSQL's statistics are refreshed after the fill
(as autovacuum does); SQLite's are left as a server's would be (it collects none by
itself). The first render of each page is shown apart: after the fill nothing is summed
into the daily totals yet, and the first totals page starts that in the background.

    .venv/bin/python benchmarks/bench_console.py              # about 2 minutes
    .venv/bin/python benchmarks/bench_console.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform as host
import random
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from _common import machine, save_results
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection, make_url

from modelyard.api.app import create_app
from modelyard.api.state import AppState
from modelyard.config import PlatformConfig
from modelyard.platform import accounts as ops
from modelyard.platform.accounts_gate import AccountsGate
from modelyard.platform.database import Database
from modelyard.platform.limits import MemoryLimiter
from modelyard.platform.money import Price
from modelyard.platform.tables import accounts, credits, usage, utcnow

TARGET_P50_MS = 50.0
DAYS = 90
ACCOUNTS = 40
BUSIEST = "acme"
CHUNK = 5_000


@dataclass(frozen=True)
class Model:
    id: str
    weight: float
    input: float
    """Price per million prompt tokens, in currency units; `output` likewise."""
    output: float
    prompt_tokens: float
    """The median prompt; `completion_tokens` the median answer (log-normal spreads)."""
    completion_tokens: float
    reasoning: float = 0.0
    """The share of the answer that is reasoning."""
    ms_per_token: float = 12.0

    @property
    def price(self) -> Price:
        return Price.from_units(self.input, self.output, self.input / 10)


MODELS = (
    Model("qwen2.5-coder-0.5b-instruct", 30, 0.05, 0.1, 400, 150, ms_per_token=8),
    Model("openai/gpt-4o-mini", 22, 0.15, 0.6, 900, 250),
    Model("anthropic/claude-sonnet-4", 12, 3.0, 15.0, 2500, 600, 0.2, 25),
    Model("gemini/gemini-2.5-flash", 10, 0.3, 2.5, 1500, 400, 0.3, 6),
    Model("deepseek-r1-distill-qwen-7b", 8, 0.2, 0.8, 600, 900, 0.6, 20),
    Model("meta/llama-3.1-8b-instruct", 8, 0.05, 0.1, 500, 200, ms_per_token=10),
    Model("mistral/mistral-small", 6, 0.2, 0.6, 700, 300, ms_per_token=14),
    Model("all-minilm-l6-v2", 4, 0.01, 0.0, 60, 0, ms_per_token=0),
)


# -- the fill ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filled:
    account_key: str
    """A key of the busiest account (signs the console in as that account)."""
    admin_key: str
    records: int
    account_records: int
    seconds: float


def account_names() -> list[str]:
    return [BUSIEST, *(f"team-{i:02d}" for i in range(1, ACCOUNTS))]


def usage_rows(key_ids: dict[str, list[tuple[str, str]]], count: int,
               seed: int = 7) -> list[dict[str, Any]]:
    """`count` usage records over the last DAYS days, oldest first. `key_ids`: each
    account's (account id, key id) pairs, the busiest account first."""
    rng = random.Random(seed)
    names = list(key_ids)
    account_weights = [1 / (rank + 1) ** 1.1 for rank in range(len(names))]
    hour_weights = [0.3 + math.sin(math.pi * max(0, h - 6) / 16) if 6 <= h <= 22 else 0.3
                    for h in range(24)]
    now = utcnow()
    start = now - timedelta(days=DAYS)
    chosen_accounts = rng.choices(names, account_weights, k=count)
    chosen_models = rng.choices(MODELS, [m.weight for m in MODELS], k=count)
    chosen_hours = rng.choices(range(24), hour_weights, k=count)
    rows: list[dict[str, Any]] = []
    for name, model, hour in zip(chosen_accounts, chosen_models, chosen_hours, strict=True):
        # later days busier (the ledger of a growing deployment)
        day = int(DAYS * math.sqrt(rng.random()))
        when = start + timedelta(days=day, hours=hour, seconds=rng.uniform(0, 3600))
        when = min(when, now - timedelta(seconds=1))
        keys = key_ids[name]
        account_id, key_id = keys[min(int(rng.expovariate(1.0)), len(keys) - 1)]
        prompt = max(1, int(rng.lognormvariate(math.log(model.prompt_tokens), 0.8)))
        cached = int(prompt * rng.uniform(0.3, 0.9)) if rng.random() < 0.3 else 0
        completion = (0 if model.completion_tokens == 0 else
                      max(1, int(rng.lognormvariate(math.log(model.completion_tokens), 0.7))))
        reasoning = int(completion * model.reasoning * rng.uniform(0.5, 1.5))
        status = rng.choices((200, 400, 429, 500, 502), (960, 10, 10, 10, 10))[0]
        disconnected = status == 200 and rng.random() < 0.02
        if status != 200:
            completion = reasoning = 0
        price = model.price
        cost = price.cost(prompt, cached, completion)
        ttft = None if model.completion_tokens == 0 else rng.uniform(20, 400)
        latency = (ttft or 5.0) + completion * model.ms_per_token * rng.uniform(0.7, 1.4)
        rows.append({
            "created_at": when, "key_id": key_id, "account_id": account_id,
            "model": model.id, "user": f"user-{rng.randrange(500)}" if rng.random() < 0.2
            else None, "prompt_tokens": prompt, "cached_tokens": cached,
            "completion_tokens": min(completion, 2**31 - 1), "reasoning_tokens": reasoning,
            "cost": cost, "reserved": price.max_cost(prompt, max(completion, 256)),
            "latency_ms": round(latency, 2), "ttft_ms": None if ttft is None else round(ttft, 2),
            "status": status, "estimated": False, "client_disconnected": disconnected,
            "settlement_id": secrets.token_hex(16), "uncollected": 0, "degraded": False})
    rows.sort(key=lambda row: row["created_at"])
    return rows


def _insert(connection: Connection, rows: list[dict[str, Any]]) -> None:
    connection.execute(usage.insert(), rows)


def _settle_totals(connection: Connection, spent: dict[str, int]) -> None:
    """Each account's running totals as the ledger says: spent what its records cost,
    credited that plus the balance it has left; one top-up per month behind it."""
    now = utcnow()
    for account_id, amount in spent.items():
        balance = connection.execute(select(accounts.c.balance).where(
            accounts.c.id == account_id)).scalar_one()
        connection.execute(update(accounts).where(accounts.c.id == account_id).values(
            spent=amount, credited=amount + balance))
        for month in range(3):
            connection.execute(credits.insert().values(
                account_id=account_id, amount=(amount + balance) // 3, note="top-up",
                created_at=now - timedelta(days=30 * month + 1)))


def _count(connection: Connection, account_id: str | None) -> int:
    query = select(func.count()).select_from(usage)
    if account_id is not None:
        query = query.where(usage.c.account_id == account_id)
    return int(connection.execute(query).scalar_one())


async def fill(db: Database, records: int) -> Filled:
    """Accounts, keys and `records` usage records in a migrated database."""
    started = time.perf_counter()
    admin_key = await ops.bootstrap_admin(db) or ""
    rng = random.Random(11)
    key_ids: dict[str, list[tuple[str, str]]] = {}
    account_key = ""
    for rank, name in enumerate(account_names()):
        account = await ops.create_account(db, name, rng.randrange(10, 5000) * 1_000_000)
        pairs = []
        for number in range(6 if rank == 0 else 1 + rng.randrange(5)):
            created = await ops.create_key(db, name, name=f"{name}-key-{number}")
            pairs.append((account.id, created.info.id))
            if rank == 0 and number == 0:
                account_key = created.text
        key_ids[name] = pairs
    rows = usage_rows(key_ids, records)
    for begin in range(0, len(rows), CHUNK):
        await db.exclusive(_insert, rows[begin:begin + CHUNK])
    spent: dict[str, int] = {}
    for row in rows:
        spent[row["account_id"]] = spent.get(row["account_id"], 0) + row["cost"]
    await db.exclusive(_settle_totals, spent)
    busiest_id = key_ids[BUSIEST][0][0]
    return Filled(account_key, admin_key, await db.read(_count, None),
                  await db.read(_count, busiest_id), time.perf_counter() - started)


# -- the measurement ----------------------------------------------------------------------


@dataclass
class Timing:
    backend: str
    who: str
    page: str
    path: str
    requests: int
    p50_ms: float
    p99_ms: float
    first_ms: float
    """The first render after the fill (it may carry one-time catch-up work)."""
    bytes: int

    @property
    def ok(self) -> bool | None:
        if self.page.startswith("baseline"):
            return None
        return self.p50_ms < TARGET_P50_MS


def pages(days_back: int) -> dict[str, list[tuple[str, str]]]:
    """(page, path) pairs timed for each role."""
    since = (utcnow() - timedelta(days=days_back)).date().isoformat()
    return {
        "account": [
            # floors for the pages below, measured in the same run: no database at all,
            # and the session lookup alone (the models page reads nothing else)
            ("baseline: stylesheet", "/console/static/console.css"),
            ("baseline: models page", "/console/models"),
            ("overview", "/console/"),
            ("usage by day, 30 days", "/console/usage"),
            ("usage by model, 90 days", f"/console/usage?by=model&since={since}"),
            ("usage by key, 90 days", f"/console/usage?by=key&since={since}"),
            ("log, newest page", "/console/log"),
            ("log, a page deep in it", "/console/log?before={middle}"),
        ],
        "operator": [
            ("overview", "/console/"),
            ("accounts", "/console/admin/accounts"),
            ("usage by day, 30 days", "/console/admin/usage"),
            ("usage by account, 90 days", f"/console/admin/usage?by=account&since={since}"),
            ("usage by model, 90 days", f"/console/admin/usage?by=model&since={since}"),
        ],
    }


CSRF_FIELD = re.compile(r'name="csrf"\s+value="([^"]*)"')


async def sign_in(client: httpx.AsyncClient, key: str) -> None:
    """Sign in as a browser does: the form, then its POST; the session cookie is kept."""
    form = await client.get("/console/sign-in")
    found = CSRF_FIELD.search(form.text)
    answer = await client.post("/console/sign-in", data={
        "key": key, "csrf": found.group(1) if found else "", "next": "/console/"})
    if answer.status_code != 303 or "modelyard_session" not in client.cookies:
        raise RuntimeError(f"signing in failed: {answer.status_code} {answer.text[:300]}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1000


def _middle_id(connection: Connection, account_key: str) -> int:
    """An id halfway down the busiest account's records (a deep page of its log)."""
    account_id = connection.execute(select(accounts.c.id).where(
        accounts.c.name == BUSIEST)).scalar_one()
    ids = select(usage.c.id).where(usage.c.account_id == account_id).order_by(usage.c.id)
    count = connection.execute(select(func.count()).select_from(ids.subquery())).scalar_one()
    return int(connection.execute(ids.offset(count // 2).limit(1)).scalar_one())


async def measure(backend: str, url: str, filled: Filled,
                  args: argparse.Namespace) -> list[Timing]:
    """Render every page `args.requests` times, one request at a time."""
    registry = CollectorRegistry()
    prices = {model.id: model.price for model in MODELS}
    gate = AccountsGate(Database(url), MemoryLimiter(), prices, PlatformConfig(), registry)
    state = AppState(providers={}, registry=registry, gate=gate)
    app = create_app(state)
    middle = await gate.db.read(_middle_id, filled.account_key)
    results: list[Timing] = []
    try:
        for who, key in (("account", filled.account_key), ("operator", filled.admin_key)):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport,
                                         base_url="http://127.0.0.1") as client:
                await sign_in(client, key)
                for name, template in pages(DAYS)[who]:
                    path = template.format(middle=middle)
                    results.append(await time_page(client, backend, who, name, path, args))
                    print(f"  {backend:10} {who:8} {name:28} p50 {results[-1].p50_ms:7.2f} ms"
                          f"  p99 {results[-1].p99_ms:7.2f} ms", flush=True)
    finally:
        await state.drain()
        await gate.close()
    return results


async def time_page(client: httpx.AsyncClient, backend: str, who: str, name: str, path: str,
                    args: argparse.Namespace) -> Timing:
    started = time.perf_counter()
    first = await client.get(path)
    first_s = time.perf_counter() - started
    if first.status_code != 200:
        raise RuntimeError(f"{path}: {first.status_code} {first.text[:300]}")
    for _ in range(args.warmup):
        await client.get(path)
    seconds: list[float] = []
    for _ in range(args.requests):
        started = time.perf_counter()
        answer = await client.get(path)
        seconds.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code}")
    return Timing(backend, who, name, path, len(seconds), percentile(seconds, 50),
                  percentile(seconds, 99), first_s * 1000, len(first.content))


async def run_backend(backend: str, url: str, args: argparse.Namespace) -> list[Timing]:
    db = Database(url)
    try:
        await db.migrate()
        filled = await fill(db, args.records)
        if not db.is_sqlite:
            await db.exclusive(_analyze)
    finally:
        await db.close()
    print(f"  {backend}: {filled.records} records ({filled.account_records} of "
          f"{BUSIEST!r}) filled in {filled.seconds:.1f} s", flush=True)
    return await measure(backend, url, filled, args)


def _analyze(connection: Connection) -> None:
    connection.exec_driver_sql("ANALYZE")


async def pg_admin(url: str, statement: str) -> None:
    parsed = make_url(url)
    connection = await asyncpg.connect(host=parsed.host, port=parsed.port or 5432,
                                       user=parsed.username, password=parsed.password,
                                       database=parsed.database, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def on_postgres(args: argparse.Namespace) -> list[Timing]:
    """The run on a PostgreSQL database of its own, dropped afterwards."""
    name = f"modelyard_bench_console_{secrets.token_hex(4)}"
    try:
        await pg_admin(args.postgres_url, f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"  postgres: skipped, PostgreSQL unavailable: {exc}")
        return []
    try:
        url = make_url(args.postgres_url).set(database=name).render_as_string(
            hide_password=False)
        return await run_backend("postgres", url, args)
    finally:
        await pg_admin(args.postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def table(results: list[Timing]) -> str:
    """One row a page, the databases side by side: p50 / p99, and the first render."""
    backends = list(dict.fromkeys(r.backend for r in results))
    found = {(r.who, r.page, r.backend): r for r in results}
    head = "| signed in as | page |" + "".join(
        f" {b} p50 / p99 ms | {b} first ms |" for b in backends) + \
        f" p50 < {TARGET_P50_MS:.0f} ms |"
    lines = [head, "|---|---|" + "---:|---:|" * len(backends) + "---|"]
    for who, page in dict.fromkeys((r.who, r.page) for r in results):
        row = [found.get((who, page, b)) for b in backends]
        cells = "".join(f" {r.p50_ms:.1f} / {r.p99_ms:.1f} | {r.first_ms:.0f} |" if r else
                        " - | - |" for r in row)
        verdicts = [r.ok for r in row if r is not None]
        verdict = "" if None in verdicts else "PASS" if all(verdicts) else "MISS"
        lines.append(f"| {who} | {page} |{cells} {verdict} |")
    return "\n".join(lines)


def machine_line() -> str:
    info = machine()
    return f"{info['cpu']}, {info['cores']} cores, Python {host.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="timed renders per page")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    if args.quick:
        args.records, args.requests, args.warmup = 10_000, 20, 2
    print(f"# console benchmark: {machine_line()}; load average {os.getloadavg()[0]:.2f}; "
          f"{args.records} usage records, {args.requests} renders per page")
    results: list[Timing] = []
    if "sqlite" in args.backends:
        with tempfile.TemporaryDirectory(prefix="modelyard-bench-console-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'platform.db'}"
            results += asyncio.run(run_backend("sqlite", url, args))
    if "postgres" in args.backends:
        results += asyncio.run(on_postgres(args))
    print()
    print(table(results))
    save_results("console", {"machine": machine_line(), "records": args.records,
                             "results": [asdict(r) for r in results]}, args)


if __name__ == "__main__":
    main()
