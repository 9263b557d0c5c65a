"""The web console at the ASGI level: signing in and out, the session cookie, CSRF, the
security headers, isolation between accounts, revocation, CSV, every page rendering."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import datetime

from modelyard.console import sessions
from modelyard.platform import accounts as ops
from tests.console.asgi_client import browser, form_token, page_token, sign_in
from tests.platform.harness import Backend, Harness, harness

ACCOUNT_PAGES = ("/console/", "/console/keys", "/console/usage", "/console/usage?by=model",
                 "/console/usage?by=key&since=2020-01-01&until=2099-12-31", "/console/log",
                 "/console/models", "/console/playground")
OPERATOR_PAGES = ("/console/admin/accounts", "/console/admin/keys", "/console/admin/usage",
                  "/console/admin/usage?by=account", "/console/admin/system")


def run(backend: Backend, body: object) -> None:
    async def main() -> None:
        async with harness(backend) as platform:
            await body(platform)  # type: ignore[operator]
    asyncio.run(main())


def test_a_browser_signs_in_with_a_key_and_out_again(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1_000_000)
        async with browser(platform) as client:
            assert (await client.get("/")).headers["location"] == "/console/"
            away = await client.get("/console/log?before=5")
            assert away.status_code == 303
            assert away.headers["location"] == "/console/sign-in?next=/console/log%3Fbefore%3D5"
            page = await client.get("/console/sign-in")
            assert page.status_code == 200 and 'id="sign-in-form"' in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            assert page.headers["x-frame-options"] == "DENY"
            assert "<script>" not in page.text and "style=" not in page.text
            token = form_token(page.text)
            wrong = await client.post("/console/sign-in", data={"csrf": token, "key": "sk-x"})
            assert wrong.status_code == 401 and 'data-testid="sign-in-error"' in wrong.text
            forged = await client.post("/console/sign-in", data={"csrf": "forged", "key": key})
            assert forged.status_code == 403
            token = form_token((await client.get("/console/sign-in")).text)
            answer = await client.post("/console/sign-in", data={
                "csrf": token, "key": key, "next": "/console/log"})
            assert (answer.status_code, answer.headers["location"]) == (303, "/console/log")
            cookie = next(v for v in answer.headers.get_list("set-cookie")
                          if v.startswith(sessions.COOKIE + "="))
            flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
            assert {"httponly", "max-age", "path"} <= flags and "secure" not in flags
            assert "samesite=strict" in cookie.lower()
            session_cookie = client.cookies[sessions.COOKIE]
            overview = await client.get("/console/")
            assert overview.status_code == 200
            assert 'data-testid="balance">1.000000<' in overview.text
            assert 'data-testid="account-name">acme<' in overview.text
            csrf = page_token(overview.text)
            assert (await client.post("/console/sign-out", data={"csrf": "nope"})
                    ).status_code == 403
            out = await client.post("/console/sign-out", data={"csrf": csrf})
            assert (out.status_code, out.headers["location"]) == (303, "/console/sign-in")
            assert sessions.COOKIE not in client.cookies
            # the old cookie is dead on the server too, not only forgotten by the browser
            client.cookies.set(sessions.COOKIE, session_cookie)
            assert (await client.get("/console/")).status_code == 303
        async with browser(platform, **{"x-forwarded-proto": "https"}) as proxied:
            page = await proxied.get("/console/sign-in")
            assert "secure" in page.headers["set-cookie"].lower()
        async with browser(platform, "https://testserver") as tls:
            token = form_token((await tls.get("/console/sign-in")).text)
            answer = await tls.post("/console/sign-in", data={"csrf": token, "key": key})
            cookie = next(v for v in answer.headers.get_list("set-cookie")
                          if v.startswith(sessions.COOKIE + "="))
            assert "secure" in cookie.lower()
    run(backend, body)


def test_forms_without_the_session_token_are_refused(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 0)
        async with browser(platform) as client:
            csrf = await sign_in(client, key)
            refused = await client.post("/console/keys", data={"name": "x"})
            assert refused.status_code == 403
            refused = await client.post("/console/keys", data={"name": "x", "csrf": "bad"})
            assert refused.status_code == 403
            elsewhere = await client.post("/console/keys", data={"name": "x", "csrf": csrf},
                                          headers={"origin": "https://evil.example"})
            assert elsewhere.status_code == 403
            assert len(await ops.list_keys(platform.db, "acme")) == 1
            made = await client.post("/console/keys", data={
                "name": "ci", "csrf": csrf, "models": "fake", "rpm": "60", "tpm": "",
                "expires": "2099-01-01"}, headers={"origin": "http://testserver"})
            assert made.status_code == 200 and 'data-testid="new-key"' in made.text
            assert "sk-my-" in made.text
            # shown once: the keys page never shows a secret again
            assert "sk-my-" not in (await client.get("/console/keys")).text
            bad = await client.post("/console/keys", data={"csrf": csrf, "rpm": "lots"})
            assert bad.status_code == 422 and "RPM" in bad.text
    run(backend, body)


def test_the_playground_calls_the_api_with_the_session_and_its_token(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1_000_000)
        request = {"model": "fake", "max_tokens": 4,
                   "messages": [{"role": "user", "content": "one two three"}]}
        async with browser(platform) as client:
            csrf = await sign_in(client, key)
            without = await client.post("/v1/chat/completions", json=request)
            assert without.status_code == 401
            forged = await client.post("/v1/chat/completions", json=request,
                                       headers={"x-csrf-token": "forged"})
            assert forged.status_code == 401
            answer = await client.post("/v1/chat/completions", json=request,
                                       headers={"x-csrf-token": csrf})
            assert answer.status_code == 200, answer.text
            await platform.settled()
            log = await client.get("/console/log")
            assert log.text.count("data-record-id=") == 1
            assert 'data-col="cost" class="num">0.000011<' in log.text
            assert (await platform.db_account("acme"))[0] == 1_000_000 - 11
    run(backend, body)


def test_a_revoked_key_ends_its_session(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1_000_000)
        async with browser(platform) as client:
            csrf = await sign_in(client, key)
            key_id = key.split("-")[2]
            await ops.revoke_key(platform.db, key_id)
            assert (await client.get("/console/")).status_code == 303
            answer = await client.post("/v1/chat/completions", headers={"x-csrf-token": csrf},
                                       json={"model": "fake", "messages": [
                                           {"role": "user", "content": "hi"}]})
            assert answer.status_code == 401
    run(backend, body)


def test_one_account_never_reaches_another_accounts_data(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        alice = await platform.key("alice", 1_000_000, name="alice-key")
        bob = await platform.key("bob", 1_000_000, name="bob-key")
        alice_id = alice.split("-")[2]
        assert (await platform.chat(alice)).status_code == 200
        await platform.settled()
        alice_account = await ops.get_account(platform.db, "alice")
        async with browser(platform) as client:
            csrf = await sign_in(client, bob)
            for path in ("/console/keys", "/console/log", "/console/usage?by=key",
                         "/console/usage.csv?by=key", "/console/"):
                page = await client.get(path)
                assert page.status_code == 200
                assert alice_id not in page.text and "alice" not in page.text, path
            revoke = await client.post(f"/console/keys/{alice_id}/revoke", data={"csrf": csrf})
            assert revoke.status_code == 404
            assert (await platform.chat(alice)).status_code == 200  # still alive
            for path in ("/console/admin/accounts", "/console/admin/keys",
                         "/console/admin/usage", "/console/admin/system"):
                assert (await client.get(path)).status_code == 403, path
            assert (await client.get("/console/admin/live.json")).status_code == 403
            topped = await client.post(f"/console/admin/accounts/{alice_account.id}/top-up",
                                       data={"csrf": csrf, "amount": "100"})
            assert topped.status_code == 403
            forged = await client.post(f"/console/admin/keys/{alice_id}/revoke",
                                       data={"csrf": csrf})
            assert forged.status_code == 403
            assert (await client.get("/console/log?before=999999999")).text.count(
                "data-record-id=") == 0
        assert (await ops.get_account(platform.db, "alice")).credited == 1_000_000
    run(backend, body)


def test_every_page_renders_for_an_account_and_an_operator(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1_000_000)
        for _ in range(3):
            assert (await platform.chat(key)).status_code == 200
        await platform.settled()
        async with browser(platform) as client:
            await sign_in(client, key)
            for path in ACCOUNT_PAGES:
                page = await client.get(path)
                assert page.status_code == 200, (path, page.text)
                assert page.headers["content-security-policy"].startswith("default-src 'none'")
                assert "style=" not in page.text and "<script>" not in page.text
            exported = await client.get("/console/usage.csv?by=model")
            assert exported.headers["content-type"].startswith("text/csv")
            rows = list(csv.reader(io.StringIO(exported.text)))
            assert rows[0][:3] == ["model", "name", "requests"]
            assert rows[1][:3] == ["fake", "", "3"] and rows[1][7] == "0.000033"
            for path in ("/console/static/console.css", "/console/static/console.js"):
                assert (await client.get(path)).status_code == 200
        async with browser(platform) as operator:
            csrf = await sign_in(operator, platform.admin_key)
            for path in (*ACCOUNT_PAGES, *OPERATOR_PAGES):
                page = await operator.get(path)
                assert page.status_code == 200, (path, page.text)
            live = await operator.get("/console/admin/live.json")
            assert live.json()["deployments"] == []
            acme = await ops.get_account(platform.db, "acme")
            topped = await operator.post(f"/console/admin/accounts/{acme.id}/top-up",
                                         data={"csrf": csrf, "amount": "2.5"})
            assert topped.status_code == 303
            accounts = await operator.get("/console/admin/accounts")
            assert 'data-testid="account-balance">3.499967<' in accounts.text
            created = await operator.post("/console/admin/accounts",
                                          data={"csrf": csrf, "name": "newco", "balance": "1"})
            assert created.status_code == 303
            assert (await ops.get_account(platform.db, "newco")).balance == 1_000_000
            by_account = await operator.get("/console/admin/usage.csv?by=account")
            assert "acme" in by_account.text
    run(backend, body)


def test_console_pages_stay_out_of_the_openapi_document(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        document = await platform.client.get(
            "/openapi.json", headers={"Authorization": f"Bearer {platform.admin_key}"})
        assert not [path for path in document.json()["paths"]
                    if path == "/" or path.startswith("/console")]
    run(backend, body)


def test_a_restricted_key_cannot_mint_a_looser_one(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 0, models=["fake"], rpm=10,
                                 expires_at=datetime(2090, 1, 1))
        async with browser(platform) as client:
            csrf = await sign_in(client, key)
            for fields in ({"rpm": "100"}, {"models": "fake,other"}, {"expires": "2095-01-01"}):
                refused = await client.post("/console/keys", data={"csrf": csrf, **fields})
                assert refused.status_code == 422, fields
            made = await client.post("/console/keys", data={"csrf": csrf, "name": "child"})
            assert made.status_code == 200
        child = next(k for k in await ops.list_keys(platform.db, "acme") if k.name == "child")
        assert (child.models, child.rpm, child.expires_at, child.is_admin) == (
            ("fake",), 10, datetime(2090, 1, 1), False)
    run(backend, body)


def test_an_unknown_console_address_is_an_html_404(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        async with browser(platform) as client:
            answer = await client.get("/console/nothing/here")
            assert answer.status_code == 404
            assert answer.headers["content-type"].startswith("text/html")
            assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    run(backend, body)
