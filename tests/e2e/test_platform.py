"""End-to-end: keys, balances, rate limits and the usage ledger on the session server
(SQLite, one process), through the official SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import INPUT_MICROS_PER_TOKEN, MODEL, OUTPUT_MICROS_PER_TOKEN
from tests.e2e.server import RunningServer

HELLO = [{"role": "user", "content": "Say hi."}]


def sdk(server: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0, timeout=120)


def micros(units: str) -> int:
    whole, _, fraction = units.partition(".")
    return int(whole) * 1_000_000 + int(fraction.ljust(6, "0"))


def usage_records(server: RunningServer, account: str, count: int) -> list[dict[str, Any]]:
    """The account's usage records, once `count` of them were written (settlement runs
    just after the response)."""
    deadline = time.monotonic() + 30
    while True:
        rows: list[dict[str, Any]] = server.admin(
            "GET", f"/usage/records?account={account}&limit=10000")["data"]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_no_key_a_wrong_key_and_a_revoked_key_are_401(server: RunningServer) -> None:
    key = server.create_key("revocable", balance="1")
    with sdk(server, key) as client:
        assert client.chat.completions.create(model=MODEL, messages=HELLO,  # type: ignore[arg-type]
                                              max_tokens=1).choices
    key_id = key.split("-")[2]
    server.admin("POST", f"/keys/{key_id}/revoke")
    for wrong in (key, key[:-1] + ("A" if key[-1] != "A" else "B"), "test-key"):
        with sdk(server, wrong) as client, pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)  # type: ignore[arg-type]
        assert caught.value.status_code == 401
        assert caught.value.response.json()["error"]["type"] == "authentication_error"
    missing = httpx.post(f"{server.api_url}/chat/completions", timeout=30,
                         json={"model": MODEL, "messages": HELLO})
    assert missing.status_code == 401


def test_a_request_the_balance_cannot_cover_is_402(server: RunningServer) -> None:
    key = server.create_key("broke", balance="0.000010")
    with sdk(server, key) as client, pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16)  # type: ignore[arg-type]
    assert caught.value.status_code == 402
    assert caught.value.response.json()["error"]["code"] == "insufficient_balance"
    assert server.admin("GET", "/accounts/broke")["balance"] == "0.000010"
    assert usage_records(server, "broke", 0) == []


def until_limited(ask: Callable[[], object], rpm: int) -> tuple[int, openai.RateLimitError]:
    """Call `ask` until it is refused; how many calls were allowed first, and the refusal.
    A bucket of `rpm` refills one request every 60/rpm s, so on a slow machine a few more
    than `rpm` may pass; never fewer."""
    started = time.monotonic()
    allowed = 0
    while True:
        try:
            ask()
        except openai.RateLimitError as exc:
            refills = int((time.monotonic() - started) * rpm / 60)
            assert rpm <= allowed <= rpm + refills, (allowed, refills)
            return allowed, exc
        allowed += 1
        assert allowed <= 3 * rpm, "never refused"


def test_rate_limits_are_429_with_retry_after_and_the_headers(server: RunningServer) -> None:
    key = server.create_key("limited", balance="1", rpm=2, tpm=100_000)
    with sdk(server, key) as client:
        first = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, max_tokens=1)  # type: ignore[arg-type]
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-limit-tokens"] == "100000"
        _, caught = until_limited(lambda: client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=1), rpm=1)  # type: ignore[arg-type]
    headers = caught.response.headers
    assert 1 <= int(headers["retry-after"]) <= 30
    assert headers["x-ratelimit-remaining-requests"] == "0"
    for name in ("limit-requests", "reset-requests", "limit-tokens", "remaining-tokens",
                 "reset-tokens"):
        assert f"x-ratelimit-{name}" in headers
    assert caught.response.json()["error"]["type"] == "rate_limit_error"


def test_a_model_outside_the_keys_list_is_404_like_an_unknown_one(
        server: RunningServer) -> None:
    key = server.create_key("narrow", balance="1", models=["some/other-model"])
    with sdk(server, key) as client:
        with pytest.raises(openai.NotFoundError) as hidden:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="no/such-model", messages=HELLO,  # type: ignore[arg-type]
                                           max_tokens=1)
        assert [m.id for m in client.models.list().data] == []
    hidden_error = hidden.value.response.json()["error"]
    unknown_error = unknown.value.response.json()["error"]
    assert hidden_error["message"].replace(MODEL, "X") == \
        unknown_error["message"].replace("no/such-model", "X")
    assert {k: v for k, v in hidden_error.items() if k != "message"} == \
        {k: v for k, v in unknown_error.items() if k != "message"}


def test_models_show_prices(client: openai.OpenAI) -> None:
    entry = client.models.list().data[0].model_dump()
    assert entry["pricing"] == {"input": float(INPUT_MICROS_PER_TOKEN), "output":
                                float(OUTPUT_MICROS_PER_TOKEN),
                                "cached_input": float(INPUT_MICROS_PER_TOKEN)}


def test_a_client_that_disconnects_is_billed_for_the_tokens_it_was_sent(
        server: RunningServer) -> None:
    key = server.create_key("leaver", balance="1")
    received = 0
    with sdk(server, key) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 500."}],
            max_tokens=400, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if received == 6:
                break
        stream.close()
    [row] = usage_records(server, "leaver", 1)
    assert row["client_disconnected"]
    # The count is the server's: every chunk it handed to the connection. The client may
    # close while one more chunk is on its way, never more than one.
    assert received <= row["completion_tokens"] <= received + 1
    assert row["cost_micros"] == (row["prompt_tokens"] * INPUT_MICROS_PER_TOKEN
                                  + row["completion_tokens"] * OUTPUT_MICROS_PER_TOKEN)
    assert row["reserved_micros"] == (row["prompt_tokens"] * INPUT_MICROS_PER_TOKEN
                                      + 400 * OUTPUT_MICROS_PER_TOKEN)
    account = server.admin("GET", "/accounts/leaver")
    assert (account["balance_micros"], account["reserved_micros"]) == (
        1_000_000 - row["cost_micros"], 0)


async def race(servers: list[RunningServer], key: str, requests: int) -> list[int]:
    """`requests` concurrent chat completions spread over the servers; their statuses."""
    clients = [openai.AsyncOpenAI(base_url=s.api_url, api_key=key, max_retries=0, timeout=300)
               for s in servers]

    async def one(i: int) -> int:
        try:
            await clients[i % len(clients)].chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=1, temperature=0)  # type: ignore[arg-type]
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    try:
        return list(await asyncio.gather(*[one(i) for i in range(requests)]))
    finally:
        for sdk_client in clients:
            await sdk_client.close()


def check_race(servers: list[RunningServer], account: str, admin: RunningServer) -> None:
    """200 concurrent requests against an account that can pay for exactly 50."""
    probe_key = admin.create_key(f"{account}-probe", balance="1")
    with sdk(servers[0], probe_key) as client:
        probe = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1,  # type: ignore[arg-type]
                                               temperature=0)
    assert probe.usage is not None and probe.usage.completion_tokens == 1
    cost = (probe.usage.prompt_tokens * INPUT_MICROS_PER_TOKEN
            + 1 * OUTPUT_MICROS_PER_TOKEN)
    initial = 50 * cost
    key = admin.create_key(account, balance=f"{initial // 1_000_000}.{initial % 1_000_000:06d}")
    statuses = asyncio.run(race(servers, key, 200))
    assert statuses.count(200) <= 50
    assert statuses.count(200) + statuses.count(402) == 200, sorted(set(statuses))
    assert statuses.count(200) == 50  # each settles at exactly its reservation
    rows = usage_records(admin, account, statuses.count(200))
    assert len(rows) == statuses.count(200)
    final = admin.admin("GET", f"/accounts/{account}")
    assert final["balance_micros"] >= 0
    assert final["reserved_micros"] == 0
    assert final["balance_micros"] == initial - sum(r["cost_micros"] for r in rows)
    assert final["spent_micros"] == sum(r["cost_micros"] for r in rows)


def test_the_race_on_sqlite_with_one_server(server: RunningServer) -> None:
    check_race([server], "racer", server)
