"""The console's walls, in Chromium against a real `modelyard serve`: one account never
reaches another's pages or keys (direct URLs, forged forms with the other's ids and CSRF
token), sign-out and a revoked key end the session, forms refuse a missing or wrong CSRF
token, and the Content-Security-Policy keeps any inline script from running."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.console.browser.conftest import NewContext
from tests.console.browser.console import (
    MODEL,
    ask,
    csrf_token,
    key_id,
    reload_until,
    sign_in,
    unfold,
)
from tests.e2e.server import RunningServer

expect = pytest.importorskip("playwright.sync_api").expect

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page, Route

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
INJECTED = ('<script>window.inlineRan = true;</script>'
            '<img src="data:," onerror="window.handlerRan = true">'
            '<a id="injected" href="javascript:window.linkRan = true">x</a>')
PLAYGROUND_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}],
                   "max_tokens": 1}


def record_ids(page: Page) -> set[str]:
    return {row.get_attribute("data-record-id") or ""
            for row in page.locator("tr[data-record-id]").all()}


def test_one_account_cannot_reach_another_accounts_pages_or_keys(
        new_context: NewContext, console_server: RunningServer) -> None:
    alice_key = console_server.create_key("iso-alice", balance="10")
    alice_id = key_id(alice_key)
    mallory_key = console_server.create_key("iso-mallory", balance="10")
    ask(console_server, alice_key, max_tokens=1)

    alice_context = new_context()
    alice = alice_context.new_page()
    sign_in(alice, alice_key, "/console/log")
    reload_until(alice, alice.locator("tr[data-record-id]"))
    alice_records = record_ids(alice)
    alice_csrf = csrf_token(alice)

    mallory_context = new_context()
    mallory = mallory_context.new_page()
    sign_in(mallory, mallory_key)
    mallory_csrf = csrf_token(mallory)
    assert mallory_csrf != alice_csrf

    # direct URLs: the operator's pages, and Alice's data under Mallory's session
    for path in ("/console/admin/accounts", "/console/admin/keys", "/console/admin/usage",
                 "/console/admin/system", "/console/admin/live.json"):
        response = mallory.goto(path)
        assert response is not None and response.status == 403, path
    newest = max(int(record) for record in alice_records)
    for path in ("/console/log", f"/console/log?before={newest + 1}"):
        mallory.goto(path)
        assert not record_ids(mallory) & alice_records, path
    for path in ("/console/keys", "/console/usage?by=key", "/console/"):
        mallory.goto(path)
        assert alice_id not in mallory.content(), path
    assert alice_id not in mallory_context.request.get("/console/usage.csv?by=key").text()

    # forged forms: Alice's key id under Mallory's own token, Alice's token under
    # Mallory's session, an operator's form from an account
    request = mallory_context.request
    forged = request.post(f"/console/keys/{alice_id}/revoke", form={"csrf": mallory_csrf},
                          max_redirects=0)
    assert forged.status == 404
    stolen_token = request.post("/console/keys", form={"csrf": alice_csrf, "name": "x"},
                                max_redirects=0)
    assert stolen_token.status == 403
    stolen_revoke = request.post(f"/console/keys/{alice_id}/revoke",
                                 form={"csrf": alice_csrf}, max_redirects=0)
    assert stolen_revoke.status in (403, 404)
    account_id = console_server.admin("GET", "/accounts/iso-mallory")["id"]
    top_up = request.post(f"/console/admin/accounts/{account_id}/top-up",
                          form={"csrf": mallory_csrf, "amount": "1000"}, max_redirects=0)
    assert top_up.status == 403
    made = request.post("/console/admin/accounts",
                        form={"csrf": mallory_csrf, "name": "iso-forged", "balance": "1"},
                        max_redirects=0)
    assert made.status == 403
    # the playground's API path: Mallory's cookie with Alice's token is no credential
    api = request.post("/v1/chat/completions", data=PLAYGROUND_BODY,
                       headers={"X-CSRF-Token": alice_csrf})
    assert api.status == 401

    assert console_server.admin("GET", "/accounts/iso-mallory")["balance"] == "10.000000"
    alice.goto("/console/keys")
    expect(alice.locator(f'tr[data-key-id="{alice_id}"]').get_by_test_id("key-status")) \
        .to_have_text("active")
    ask(console_server, alice_key, max_tokens=1)


def test_sign_out_and_a_revoked_key_end_the_session(
        new_context: NewContext, console_server: RunningServer) -> None:
    key = console_server.create_key("leaving", balance="1")
    context = new_context()
    page = context.new_page()
    sign_in(page, key)
    cookies = context.cookies()
    assert any(cookie["name"] == "modelyard_session" for cookie in cookies)
    page.get_by_test_id("sign-out").click()
    page.wait_for_url("**/console/sign-in**")
    assert not any(c["name"] == "modelyard_session" for c in context.cookies())
    page.goto("/console/keys")
    assert "/console/sign-in" in page.url
    # the old cookie, played back, is no session any more
    replay = new_context()
    replay.add_cookies(cookies)
    replayed = replay.new_page()
    replayed.goto("/console/keys")
    assert "/console/sign-in" in replayed.url

    # a session whose key is revoked ends at its next request, the API path's too
    second = console_server.create_key("leaving")
    page = new_context().new_page()
    sign_in(page, second)
    token = csrf_token(page)
    console_server.admin("POST", f"/keys/{key_id(second)}/revoke")
    page.goto("/console/usage")
    assert "/console/sign-in" in page.url
    api = page.context.request.post("/v1/chat/completions", data=PLAYGROUND_BODY,
                                    headers={"X-CSRF-Token": token})
    assert api.status == 401
    # and the revoked key signs in no more
    page.locator("#key").fill(second)
    page.get_by_test_id("sign-in-submit").click()
    expect(page.get_by_test_id("sign-in-error")).to_be_visible()


def test_forms_need_the_csrf_token_and_the_csp_runs_no_inline_script(
        page: Page, context: BrowserContext, console_server: RunningServer) -> None:
    key = console_server.create_key("guarded", balance="1")
    sign_in(page, key, "/console/keys")
    response = page.goto("/console/keys")
    assert response is not None
    headers = response.headers
    assert headers["content-security-policy"] == CSP
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert "no-store" in headers["cache-control"]
    [session] = [c for c in context.cookies() if c["name"] == "modelyard_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert "modelyard_session" not in page.evaluate("document.cookie")

    # a POST without the token, or with a wrong one, is refused and does nothing
    keys_before = page.locator("tr[data-key-id]").count()
    for form in ({"name": "no token"}, {"name": "wrong token", "csrf": "0" * 43}):
        refused = context.request.post("/console/keys", form=form, max_redirects=0)
        assert refused.status == 403, form
    sign_out = context.request.post("/console/sign-out", form={}, max_redirects=0)
    assert sign_out.status == 403
    # the session cookie alone does not call the API (the playground sends the token too)
    bare = context.request.post("/v1/chat/completions", data=PLAYGROUND_BODY)
    assert bare.status == 401
    page.reload()
    expect(page.locator("tr[data-key-id]")).to_have_count(keys_before)

    # a key name made of markup is shown as text
    unfold(page, "#key-form")
    page.locator("#key-name").fill('<img src="data:," onerror="window.nameRan = true">')
    page.get_by_test_id("create-key").click()
    expect(page.get_by_test_id("new-key")).to_be_visible()
    expect(page.get_by_test_id("keys-table")).to_contain_text('<img src="data:,"')
    assert page.evaluate("window.nameRan") is None

    # markup slipped into a page (as an injection would) does not run under the CSP,
    # while the console's own script does
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)

    def inject(route: Route) -> None:
        answer = route.fetch()
        route.fulfill(response=answer,
                      body=answer.text().replace("</main>", f"{INJECTED}</main>", 1))

    page.route("**/console/keys", inject)
    page.goto("/console/keys")
    page.locator("#injected").click()
    page.wait_for_timeout(200)
    assert page.evaluate("[window.inlineRan, window.handlerRan, window.linkRan]") == \
        [None, None, None]
    assert violations, "the browser reported no CSP violation"
    assert page.evaluate("Array.from(document.scripts).some(s => s.src.endsWith("
                         "'/console/static/console.js'))")
