"""The admin HTTP API: accounts, top-ups, keys, revocation, usage."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.platform.harness import Backend, Harness, harness


def test_the_admin_api_end_to_end(backend: Backend) -> None:
    async def main() -> None:
        async with harness(backend) as platform:
            await check(platform)

    async def check(platform: Harness) -> None:
        auth = {"Authorization": f"Bearer {platform.admin_key}"}

        async def call(method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
            response = await platform.client.request(method, f"/admin{path}", headers=auth,
                                                     **kwargs)
            assert response.status_code == status, response.text
            return response.json()

        created = await call("POST", "/accounts", 201, json={"name": "acme",
                                                             "balance": "0.000050"})
        assert (created["name"], created["balance"], created["balance_micros"]) == (
            "acme", "0.000050", 50)
        assert (await call("POST", "/accounts", 409, json={"name": "acme"}))["error"][
            "code"] == "conflict"
        bad = await call("POST", "/accounts", 422, json={"name": "x", "balance": "0.0000001"})
        assert bad["error"]["param"] == "balance"
        await call("POST", "/accounts", 400, content=b"not json")
        topped = await call("POST", "/accounts/acme/topup", json={"amount": 1.5})
        assert topped["balance"] == "1.500050"
        await call("POST", "/accounts/nobody/topup", 404, json={"amount": 1})
        key = await call("POST", "/keys", 201, json={
            "account": "acme", "models": ["fake"], "rpm": 100, "tpm": 10000,
            "expires": "2099-01-01", "name": "ci"})
        assert key["key"].startswith(f"sk-my-{key['id']}-")
        assert (key["models"], key["rpm"], key["expires_at"]) == (
            ["fake"], 100, "2099-01-01T00:00:00Z")
        await call("POST", "/keys", 422, json={"account": "acme", "expires": "soon"})
        await call("POST", "/keys", 404, json={"account": "nobody"})
        assert (await platform.chat(key["key"])).status_code == 200
        await platform.settled()
        listed = await call("GET", "/keys?account=acme")
        assert [k["id"] for k in listed["data"]] == [key["id"]]
        assert "key" not in listed["data"][0]
        by_model = await call("GET", "/usage?by=model")
        assert by_model["data"] == [{
            "group": "fake", "requests": 1, "prompt_tokens": 3, "cached_tokens": 0,
            "completion_tokens": 4, "reasoning_tokens": 0, "cost": "0.000011",
            "cost_micros": 11, "uncollected": "0.000000", "uncollected_micros": 0}]
        await call("GET", "/usage?by=week", 422)
        assert len((await call("GET", "/usage/records?account=acme"))["data"]) == 1
        assert (await call("GET", "/accounts/acme"))["spent"] == "0.000011"
        revoked = await call("POST", f"/keys/{key['id']}/revoke")
        assert revoked["revoked_at"] is not None
        assert (await platform.chat(key["key"])).status_code == 401
        await call("POST", "/keys/000000000000/revoke", 404)
        names = [a["name"] for a in (await call("GET", "/accounts"))["data"]]
        assert names == ["admin", "acme"]

    asyncio.run(main())


MAX_UNITS = 10**12


def test_hostile_amounts_and_names_get_spec_errors(backend: Backend) -> None:
    """Finding 10: amounts had no upper bound (an overflow: a 500 on PostgreSQL, a float on
    SQLite) and text no check (a NUL: a 500 on PostgreSQL). Every answer here is a 4xx in
    SPEC.md's shape, and the books stay whole integers."""
    async def main() -> None:
        async with harness(backend) as platform:
            await check(platform)

    async def check(platform: Harness) -> None:
        auth = {"Authorization": f"Bearer {platform.admin_key}"}

        async def call(method: str, path: str, status: int, **kwargs: Any) -> Any:
            response = await platform.client.request(method, f"/admin{path}", headers=auth,
                                                     **kwargs)
            assert response.status_code == status, (path, kwargs, response.text)
            body = response.json()
            if status >= 400:
                assert set(body["error"]) == {"message", "type", "param", "code"}, body
            return body

        def raw(body: str) -> dict[str, Any]:
            return {"content": body.encode(), "headers": {**auth,
                                                          "Content-Type": "application/json"}}

        for balance in ["-1", -1, "1e309", "1E3", "\u0661\u0660", "10\x00", "0x10", "NaN", "inf",
                        "9" * 5000, str(MAX_UNITS + 1), MAX_UNITS + 1, 1e300, 10**40,
                        "1.0000001", "", " ", "1 000"]:
            refused = await call("POST", "/accounts", 422, json={"name": "x",
                                                                 "balance": balance})
            assert refused["error"]["param"] == "balance", balance
        for body in ['{"name": "x", "balance": 1e309}', '{"name": "x", "balance": NaN}',
                     '{"name": "x", "balance": -Infinity}',
                     '{"name": "x", "balance": 1' + "0" * 5000 + "}"]:
            assert (await platform.client.post("/admin/accounts", **raw(body))
                    ).status_code in (400, 422), body
        for balance in [True, None, [1], {"units": 1}]:
            await call("POST", "/accounts", 400, json={"name": "x", "balance": balance})
        nested = '{"name": "x", "balance": ' + "[" * 100_000 + "]" * 100_000 + "}"
        response = await platform.client.post("/admin/accounts", **raw(nested))
        assert response.status_code == 400
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        for name in ["a\x00b", "tab\tname", "x" * 201, "   "]:
            await call("POST", "/accounts", 422, json={"name": name})
        await call("POST", "/accounts", 400, content=json.dumps({"name": "\ud800"}).encode())
        assert [a["name"] for a in (await call("GET", "/accounts", 200))["data"]] == ["admin"]

        rich = await call("POST", "/accounts", 201, json={"name": "rich",
                                                          "balance": str(MAX_UNITS - 1)})
        assert rich["balance_micros"] == (MAX_UNITS - 1) * 10**6
        await call("POST", "/accounts/rich/topup", 422, json={"amount": "2"})
        await call("POST", "/accounts/rich/topup", 422, json={"amount": str(MAX_UNITS + 1)})
        topped = await call("POST", "/accounts/rich/topup", 200, json={"amount": 1})
        assert (topped["balance_micros"], topped["balance"]) == (
            MAX_UNITS * 10**6, f"{MAX_UNITS}.000000")
        assert isinstance(topped["balance_micros"], int)
        assert (await call("GET", "/accounts/rich", 200))["credited_micros"] == MAX_UNITS * 10**6

        for path in ["/accounts/a%00b", "/accounts/%ED%A0%80"]:
            await call("GET", path, 404)
        await call("POST", "/accounts/a%00b/topup", 404, json={"amount": 1})
        await call("POST", "/keys/%00%00/revoke", 404)
        await call("POST", "/keys/" + "0" * 12 + "%00/revoke", 404)
        await call("POST", "/keys", 404, json={"account": "a\x00b"})
        await call("POST", "/keys", 422, json={"account": "rich", "name": "k\x00"})
        await call("POST", "/keys", 422, json={"account": "rich", "models": ["m\x00"]})
        await call("POST", "/keys", 422, json={"account": "rich", "expires": "2099\x00"})
        await call("POST", "/keys", 422, json={"account": "rich", "rpm": 2**31})
        assert (await call("GET", "/keys?account=a%00b", 200))["data"] == []
        assert (await call("GET", "/usage/records?key=%00", 200))["data"] == []
        await call("GET", "/usage?account=a%00b", 404)
        await call("GET", "/usage/records?account=a%00b", 404)
        await call("GET", "/usage?since=2026%00", 422)

    asyncio.run(main())
