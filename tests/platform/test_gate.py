"""The accounts gate in the real app, in front of an instant fake model: 401, 402, 404, 429,
settlement and the usage record, on SQLite (limits in memory) and PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import timedelta

from modelyard.config import PlatformConfig
from modelyard.platform import accounts as ops
from modelyard.platform import ledger
from modelyard.platform.accounts_gate import AccountsGate
from modelyard.platform.database import Database
from modelyard.platform.gate import PlatformError
from modelyard.platform.limits import MemoryLimiter
from modelyard.platform.tables import utcnow
from modelyard.platform.usage import records
from modelyard.providers.base import ChatDelta, ChatRequest, ChatStream, DeltaStream, PreparedChat
from modelyard.usage import Usage
from tests.platform.harness import Backend, Harness, scenario


async def account_row(platform: Harness, name: str) -> tuple[int, int, int]:
    account = await ops.get_account(platform.db, name)
    return account.balance, account.reserved, account.spent


def test_requests_without_a_valid_key_are_401(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        good = await platform.key("acme", 1000)
        revoked = await platform.key("acme")
        await ops.revoke_key(platform.db, revoked.split("-")[2])
        expired = (await ops.create_key(platform.db, "acme",
                                        expires_at=utcnow() - timedelta(seconds=1))).text
        key_id = good.split("-")[2]
        wrong_secret = f"sk-my-{key_id}-{'A' * 43}"
        for key in (None, "", "test-key", wrong_secret, "sk-my-000000000000-x", revoked,
                    expired):
            response = await platform.chat(key)
            assert response.status_code == 401, key
            error = response.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await platform.chat(good)).status_code == 200
        assert (await platform.client.get("/health")).status_code == 200
        assert platform.provider.started == 1
    scenario(backend, body)


def test_a_model_outside_the_keys_list_is_404_like_an_unknown_model(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        limited = await platform.key("acme", 1000, models=["other"])
        hidden = await platform.chat(limited, model="fake")
        unknown = await platform.chat(limited, model="no/such-model")
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.json()["error"]["message"].replace("fake", "X") == \
            unknown.json()["error"]["message"].replace("no/such-model", "X")
        assert {k: v for k, v in hidden.json()["error"].items() if k != "message"} == \
            {k: v for k, v in unknown.json()["error"].items() if k != "message"}
        listed = await platform.client.get("/v1/models",
                                           headers={"Authorization": f"Bearer {limited}"})
        assert listed.json()["data"] == []
        assert platform.provider.started == 0
    scenario(backend, body)


def test_models_show_the_configured_prices(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 0)
        listed = await platform.client.get("/v1/models",
                                           headers={"Authorization": f"Bearer {key}"})
        [entry] = listed.json()["data"]
        assert entry["id"] == "fake"
        assert entry["pricing"] == {"input": 1.0, "cached_input": 1.0, "output": 2.0}
    scenario(backend, body)


def test_a_request_the_balance_cannot_cover_is_402_and_never_runs(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        # 3 prompt tokens at 1 + 4 completion tokens at 2: at most 11 micro-units.
        key = await platform.key("acme", 10)
        refused = await platform.chat(key)
        assert refused.status_code == 402
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_balance", "insufficient_balance")
        assert "0.000011" in error["message"]
        assert platform.provider.started == 0
        assert (await platform.chat(key, max_tokens=3)).status_code == 200
        await platform.settled()
        assert await account_row(platform, "acme") == (1, 0, 9)
    scenario(backend, body)


def test_a_finished_request_is_settled_and_recorded(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        answer = await platform.chat(key, max_tokens=5, user="end-user-7")
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == 5
        await platform.settled()
        assert await account_row(platform, "acme") == (1000 - 13, 0, 13)
        [row] = await records(platform.db)
        assert (row.usage.prompt_tokens, row.usage.completion_tokens, row.cost, row.reserved,
                row.status, row.user, row.model) == (3, 5, 13, 13, 200, "end-user-7", "fake")
        assert row.key_id == key.split("-")[2]
        assert row.latency_ms >= 0 and row.ttft_ms is not None
    scenario(backend, body)


def test_rate_limits_answer_429_with_the_headers(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000, rpm=2, tpm=1000)
        first = await platform.chat(key)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-limit-tokens"] == "1000"
        assert first.headers["x-ratelimit-remaining-tokens"] == "993"
        assert (await platform.chat(key)).status_code == 200
        refused = await platform.chat(key)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        for name in ("reset-requests", "limit-tokens", "remaining-tokens", "reset-tokens"):
            assert f"x-ratelimit-{name}" in refused.headers
        too_big = await platform.key("acme", tpm=10)
        huge = await platform.chat(too_big, max_tokens=8)
        assert huge.status_code == 429
        assert "more than the key's limit" in huge.json()["error"]["message"]
        assert platform.provider.started == 2
    scenario(backend, body)


def test_unused_tokens_go_back_to_the_tpm_limit(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000, tpm=30)
        # Each request takes 3 + 20 tokens and the model stops after 2: without the
        # refund of the 18 it did not generate, the second request could not run.
        for _ in range(2):
            answer = await platform.chat(key, max_tokens=20)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 2
            await platform.settled()
    scenario(backend, body, answer_tokens=2)


def test_an_admin_key_is_needed_for_the_admin_api(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        user = await platform.key("acme", 0)
        denied = await platform.client.get("/admin/accounts",
                                           headers={"Authorization": f"Bearer {user}"})
        assert denied.status_code == 403
        assert set(denied.json()["error"]) == {"message", "type", "param", "code"}
        assert (await platform.client.get("/admin/accounts")).status_code == 401
    scenario(backend, body)


def test_the_gate_keeps_its_reservations_alive_and_sweeps_others(backend: Backend) -> None:
    settings = PlatformConfig(reservation_ttl_seconds=0.3, sweep_interval_seconds=0.1)

    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        account = await ops.get_account(platform.db, "acme")
        # A reservation left by a gateway that crashed: nobody extends it.
        crashed = await ledger.reserve(platform.db, account.id, "k0", 100, 0.3)
        assert crashed is not None
        # A request that runs 4 times longer than the expiry (20 tokens, 60 ms apart).
        answer = await platform.chat(key, max_tokens=20)
        assert answer.status_code == 200
        await platform.settled()
        [row] = await records(platform.db)
        assert row.reserved == row.cost == 3 + 40  # settled against its own reservation
        assert await account_row(platform, "acme") == (1000 - 43, 0, 43)
    scenario(backend, body, delay_s=0.06, settings=settings, start=True)


def test_a_key_cache_trades_revocation_delay_for_lookups(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        assert (await platform.chat(key)).status_code == 200
        await ops.revoke_key(platform.db, key.split("-")[2])
        # Cached for a minute: still accepted on this gateway until the entry expires.
        assert (await platform.chat(key)).status_code == 200
        platform.gate._key_cache.clear()
        assert (await platform.chat(key)).status_code == 401
    scenario(backend, body, settings=PlatformConfig(key_cache_seconds=60))


def test_an_unreachable_database_is_503_not_a_stack_trace() -> None:
    async def main() -> None:
        gate = AccountsGate(Database("postgresql://nobody@127.0.0.1:1/none"), MemoryLimiter(),
                            {}, PlatformConfig())
        try:
            await gate.authenticate(f"Bearer sk-my-0123456789ab-{'x' * 43}")
        except PlatformError as exc:
            assert exc.status == 503
            assert exc.headers["Retry-After"] == "1"
        else:
            raise AssertionError("no error")
        finally:
            await gate.close()
    asyncio.run(main())


# -- the request's budget before its body, its bill whatever ends it ---------------------------


def test_the_request_rate_is_checked_before_the_body_is_read(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000, rpm=1)
        assert (await platform.chat(key)).status_code == 200
        refused = await platform.client.post(
            "/v1/chat/completions", content=b"{not json" * 1000,
            headers={"Authorization": f"Bearer {key}"})
        assert refused.status_code == 429  # not the 400 the body would get
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "retry-after" in refused.headers
    scenario(backend, body)


def test_a_key_without_balance_is_refused_before_its_prompt_is_prepared(
        backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("broke", 0)
        prepared: list[ChatRequest] = []
        original = platform.provider.prepare_chat

        async def counting(request: ChatRequest) -> PreparedChat:
            prepared.append(request)
            return await original(request)
        platform.provider.prepare_chat = counting  # type: ignore[method-assign]
        refused = await platform.chat(key, content="word " * 50_000)
        assert refused.status_code == 402
        assert refused.json()["error"]["type"] == "insufficient_balance"
        assert prepared == []
    scenario(backend, body)


def test_a_failure_after_admission_is_a_500_that_settles_and_gives_everything_back(
        backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000, tpm=30)

        async def broken(prepared: PreparedChat[None]) -> ChatStream:
            raise RuntimeError("secret internals")
        platform.provider.start_chat = broken  # type: ignore[method-assign]
        # Each request takes 3 + 20 of the key's 30 tokens a minute: without the refund of
        # a failed request's tokens, the second would be refused.
        for _ in range(3):
            failed = await platform.chat(key, max_tokens=20)
            assert failed.status_code == 500, failed.text
            error = failed.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "server_error" and "secret" not in error["message"]
            await platform.settled()
        assert await account_row(platform, "acme") == (1000, 0, 0)
        rows = await records(platform.db)
        assert [(r.status, r.client_disconnected, r.cost) for r in rows] == [(500, False, 0)] * 3
    scenario(backend, body)


def test_a_stream_that_fails_midway_ends_with_an_error_event_and_is_billed_as_500(
        backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)

        async def two_then_fail(prepared: PreparedChat[None]) -> ChatStream:
            async def deltas() -> AsyncGenerator[ChatDelta, None]:
                yield ChatDelta("a", Usage(prepared.prompt_tokens, completion_tokens=1))
                yield ChatDelta("b", Usage(prepared.prompt_tokens, completion_tokens=2))
                raise ValueError("secret internals")
            return DeltaStream(deltas())
        platform.provider.start_chat = two_then_fail  # type: ignore[method-assign]
        response = await platform.chat(key, max_tokens=10, stream=True)
        assert response.status_code == 200
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert '"error"' in events[-2] and "secret" not in events[-2]
        await platform.settled()
        [row] = await records(platform.db)
        assert (row.status, row.client_disconnected, row.usage.completion_tokens, row.cost) == (
            500, False, 2, 3 + 2 * 2)
        assert await account_row(platform, "acme") == (1000 - 7, 0, 7)
    scenario(backend, body)


def test_requests_in_flight_are_limited_per_key_and_per_account(backend: Backend) -> None:
    settings = PlatformConfig(max_concurrent_per_key=2, max_concurrent_per_account=3)

    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 10_000)
        other = await platform.key("acme")
        running = [asyncio.create_task(platform.chat(key, max_tokens=10)) for _ in range(2)]
        await asyncio.sleep(0.1)
        refused = await platform.chat(key)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error",
                                                  "concurrency_limit_exceeded")
        assert refused.headers["retry-after"] == "1"
        assert "API key" in error["message"]
        running.append(asyncio.create_task(platform.chat(other, max_tokens=10)))
        await asyncio.sleep(0.1)
        by_account = await platform.chat(other)
        assert by_account.status_code == 429
        assert "account" in by_account.json()["error"]["message"]
        assert [r.status_code for r in await asyncio.gather(*running)] == [200] * 3
        assert platform.provider.started == 3
        # every slot was given back: the key may run two at once again
        again = await asyncio.gather(*[platform.chat(key) for _ in range(2)])
        assert [r.status_code for r in again] == [200, 200]
        if isinstance(platform.gate.limiter, MemoryLimiter):
            assert platform.gate.limiter.in_flight(key.split("-")[2]) == 0
    scenario(backend, body, delay_s=0.05, settings=settings)


def test_several_choices_may_not_ask_for_more_than_the_request_cap(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 10_000)
        platform.state.max_request_tokens = 100
        refused = await platform.chat(key, n=4, max_tokens=26)
        assert refused.status_code == 422
        assert refused.json()["error"]["param"] == "n"
        assert (await platform.chat(key, n=4, max_tokens=25)).status_code == 200
        assert platform.provider.started == 1
    scenario(backend, body)


def test_a_key_may_carry_its_own_limit_of_requests_in_flight(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        await ops.create_account(platform.db, "acme", 10_000)
        created = await platform.client.post(
            "/admin/keys", json={"account": "acme", "max_concurrent": 1},
            headers={"Authorization": f"Bearer {platform.admin_key}"})
        assert created.status_code == 201 and created.json()["max_concurrent"] == 1
        single = created.json()["key"]
        default = await platform.key("acme")
        running = asyncio.create_task(platform.chat(single, max_tokens=10))
        await asyncio.sleep(0.1)
        assert (await platform.chat(single)).status_code == 429  # its own limit: 1
        both = await asyncio.gather(*[platform.chat(default, max_tokens=3) for _ in range(2)])
        assert [r.status_code for r in both] == [200, 200]  # the default: 2
        assert (await running).status_code == 200
    scenario(backend, body, delay_s=0.05, settings=PlatformConfig(max_concurrent_per_key=2))
