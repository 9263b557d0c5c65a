"""An account's fair-share weight and a key's priority: set through the admin API, stored
(SQLite, PostgreSQL), and carried by the account's requests to the provider."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelyard.cli import main
from modelyard.engine.sequence import Share
from modelyard.platform import accounts as ops
from tests.platform.harness import Backend, Harness, scenario


async def admin(platform: Harness, path: str, body: dict[str, Any]) -> Any:
    response = await platform.client.post(
        f"/admin{path}", json=body, headers={"Authorization": f"Bearer {platform.admin_key}"})
    return response


def test_weight_and_priority_reach_the_provider(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        created = await admin(platform, "/accounts",
                              {"name": "acme", "balance": "10", "weight": 3})
        assert created.status_code == 201 and created.json()["weight"] == 3.0
        account_id = created.json()["id"]
        key = await admin(platform, "/keys", {"account": "acme", "priority": 2})
        assert key.status_code == 201 and key.json()["priority"] == 2
        plain = await platform.key("acme")

        assert (await platform.chat(key.json()["key"])).status_code == 200
        assert (await platform.chat(plain)).status_code == 200
        response = await platform.client.post(
            "/v1/completions", headers={"Authorization": f"Bearer {plain}"},
            json={"model": "fake", "prompt": "one two", "max_tokens": 2})
        assert response.status_code == 200
        assert platform.provider.shares == [Share(account_id, 3.0, 2), Share(account_id, 3.0),
                                            Share(account_id, 3.0)]

        changed = await admin(platform, "/accounts/acme/weight", {"weight": 0.5})
        assert changed.status_code == 200 and changed.json()["weight"] == 0.5
        assert (await platform.chat(plain)).status_code == 200
        assert platform.provider.shares[-1] == Share(account_id, 0.5)
    scenario(backend, body)


def test_an_account_without_a_weight_has_weight_one(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("plain", 10_000)
        assert (await ops.get_account(platform.db, "plain")).weight == 1.0
        assert (await platform.chat(key)).status_code == 200
        [share] = platform.provider.shares
        assert share is not None and (share.weight, share.priority) == (1.0, 0)
    scenario(backend, body)


def test_weights_and_priorities_out_of_bounds_are_422(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        await platform.key("acme", 10_000)
        for path, payload in [("/accounts", {"name": "zero", "weight": 0}),
                              ("/accounts", {"name": "huge", "weight": 1e9}),
                              ("/accounts/acme/weight", {"weight": -1}),
                              ("/keys", {"account": "acme", "priority": 1000})]:
            response = await admin(platform, path, payload)
            assert response.status_code == 422, (path, payload, response.text)
        assert (await admin(platform, "/accounts/acme/weight", {"weight": "2"})).status_code \
            == 400   # a string is no weight
        assert (await admin(platform, "/accounts/nobody/weight", {"weight": 2})).status_code \
            == 404
    scenario(backend, body)


def test_the_commands_set_weights_and_priorities(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELYARD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MODELYARD_DATABASE_URL", raising=False)

    def cli(*args: str) -> Any:
        assert main([*args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    assert cli("accounts", "create", "acme", "--weight", "2")[0]["weight"] == 2.0
    assert cli("accounts", "weight", "acme", "0.5")[0]["weight"] == 0.5
    created = cli("keys", "create", "--account", "acme", "--priority", "3")
    [key] = [k for k in cli("keys", "list") if k["id"] == created["id"]]
    assert key["priority"] == 3
    assert main(["accounts", "weight", "acme", "0"]) == 2   # out of bounds: a message
    assert capsys.readouterr().err.startswith("modelyard: ")
