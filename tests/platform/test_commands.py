"""`modelyard accounts|keys|usage` against the database `serve` uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelyard.cli import main


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_admin_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELYARD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MODELYARD_DATABASE_URL", raising=False)
    assert cli(capsys, "accounts", "create", "acme", "--balance", "2.5")[0] == 0
    code, out, _ = cli(capsys, "accounts", "topup", "acme", "0.000001", "--json")
    assert code == 0 and json.loads(out)[0]["balance"] == "2.500001"
    code, out, _ = cli(capsys, "keys", "create", "--account", "acme", "--models", "a,b",
                       "--rpm", "5", "--tpm", "500", "--expires", "2099-12-31", "--json")
    created = json.loads(out)
    assert set(created) == {"key", "id"}
    assert created["key"].startswith(f"sk-my-{created['id']}-")
    code, out, _ = cli(capsys, "keys", "list")
    assert created["id"] in out and "a,b" in out and created["key"] not in out
    code, out, _ = cli(capsys, "keys", "revoke", created["id"], "--json")
    assert code == 0 and json.loads(out)[0]["revoked_at"]
    code, out, _ = cli(capsys, "usage", "--by", "model", "--since", "2020-01-01")
    assert code == 0 and out.split()[:2] == ["MODEL", "REQUESTS"]
    code, out, _ = cli(capsys, "accounts", "list")
    assert "acme" in out and "2.500001" in out
    assert (tmp_path / "data" / "modelyard.db").exists()


@pytest.mark.parametrize("args", [
    ("accounts", "create", "acme", "--balance", "1.0000001"),
    ("accounts", "topup", "nobody", "1"),
    ("keys", "create", "--account", "nobody", "--json"),
    ("keys", "revoke", "000000000000"),
    ("keys", "create", "--account", "acme", "--expires", "someday"),
    ("usage", "--account", "nobody"),
])
def test_mistakes_are_one_line_messages(args: tuple[str, ...], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELYARD_DATA_DIR", str(tmp_path))
    assert cli(capsys, "accounts", "create", "acme")[0] == 0
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert err.startswith("modelyard: ") and "Traceback" not in err


def test_the_commands_use_the_configured_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        postgres_url: str) -> None:
    config = tmp_path / "modelyard.toml"
    config.write_text(f'database_url = "{postgres_url}"\n')
    monkeypatch.setenv("MODELYARD_DATA_DIR", str(tmp_path))
    code, out, _ = cli(capsys, "accounts", "create", "pg-only", "--balance", "1",
                       "--config", str(config), "--json")
    assert code == 0 and json.loads(out)[0]["name"] == "pg-only"
    assert not (tmp_path / "modelyard.db").exists()
    monkeypatch.setenv("MODELYARD_DATABASE_URL", postgres_url)
    code, out, _ = cli(capsys, "accounts", "list", "--json")
    assert "pg-only" in [a["name"] for a in json.loads(out)]


def test_an_unreachable_database_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELYARD_DATABASE_URL", "postgresql://nobody:secret@127.0.0.1:1/x")
    code, _, err = cli(capsys, "accounts", "list")
    assert code == 2
    assert "cannot use the database" in err and "secret" not in err
