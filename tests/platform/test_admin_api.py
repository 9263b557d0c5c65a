"""The admin HTTP API: accounts, top-ups, keys, revocation, usage."""

from __future__ import annotations

import asyncio
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
            "cost_micros": 11}]
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
