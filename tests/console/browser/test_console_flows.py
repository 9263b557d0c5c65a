"""The console in Chromium, against a real `modelyard serve`: signing in, keys made in the
console and used from the `openai` SDK, the log and its costs, the operator's top-up, the
playground's streamed answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.console.browser.conftest import (
    INPUT_MICROS_PER_TOKEN,
    OUTPUT_MICROS_PER_TOKEN,
    NewContext,
)
from tests.console.browser.console import (
    AMOUNT,
    MODEL,
    ask,
    key_id,
    number,
    reload_until,
    sign_in,
    unfold,
    units,
)
from tests.e2e.server import RunningServer

expect = pytest.importorskip("playwright.sync_api").expect

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page


def cost_of(prompt_tokens: int, completion_tokens: int) -> int:
    return prompt_tokens * INPUT_MICROS_PER_TOKEN + completion_tokens * OUTPUT_MICROS_PER_TOKEN


def test_a_key_made_in_the_console_is_used_from_the_sdk_and_billed_in_the_log(
        page: Page, context: BrowserContext, console_server: RunningServer) -> None:
    key = console_server.create_key("alice", balance="10")
    sign_in(page, key)
    expect(page.get_by_test_id("account-name")).to_have_text("alice")
    expect(page.get_by_test_id("balance")).to_have_text("10.000000")

    page.get_by_test_id("nav-keys").click()
    unfold(page, "#key-form")
    page.locator("#key-name").fill("made in the console")
    page.locator("#key-rpm").fill("60")
    page.get_by_test_id("create-key").click()
    new_key = page.get_by_test_id("new-key").inner_text().strip()
    new_id = key_id(new_key)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_test_id("copy-key").click()
    expect(page.get_by_test_id("copy-key")).to_have_attribute("data-copied", "true")
    assert page.evaluate("navigator.clipboard.readText()") == new_key
    made = page.locator(f'tr[data-key-id="{new_id}"]')
    expect(made.get_by_test_id("key-status")).to_have_text("active")
    expect(made).to_contain_text("made in the console")
    # shown once: the keys page never shows the secret again
    page.goto("/console/keys")
    expect(page.locator(f'tr[data-key-id="{new_id}"]')).to_have_count(1)
    expect(page.get_by_test_id("new-key")).to_have_count(0)
    assert new_key not in page.content()

    usage = ask(console_server, new_key)
    cost = cost_of(usage.prompt_tokens, usage.completion_tokens)
    page.get_by_test_id("nav-log").click()
    record = reload_until(page, page.locator("tr[data-record-id]")).first
    expect(record.locator("td[data-col=model]")).to_contain_text(MODEL)
    expect(record.locator("td[data-col=key]")).to_contain_text(new_id)
    expect(record.locator("td[data-col=prompt]")).to_have_text(str(usage.prompt_tokens))
    expect(record.locator("td[data-col=completion]")).to_have_text(
        str(usage.completion_tokens))
    expect(record.locator("td[data-col=cost]")).to_have_text(units(cost))
    expect(record.locator("td[data-col=status]")).to_have_text("200")

    page.get_by_test_id("nav-overview").click()
    expect(page.get_by_test_id("balance")).to_have_text(units(10_000_000 - cost))
    expect(page.get_by_test_id("spend-today")).to_have_text(units(cost))
    expect(page.locator(f'[data-testid=by-model] tr[data-model="{MODEL}"]')).to_have_count(1)

    page.goto("/console/usage?by=key")
    expect(page.locator(f'[data-testid=usage-table] tr[data-group="{new_id}"]')) \
        .to_have_count(1)
    csv = context.request.get("/console/usage.csv?by=model")
    assert csv.status == 200
    assert csv.headers["content-type"].startswith("text/csv")
    assert MODEL in csv.text()


def test_the_operator_tops_up_an_account_and_its_owner_sees_the_balance(
        new_context: NewContext, console_server: RunningServer) -> None:
    key = console_server.create_key("bob", balance="5")
    operator = new_context().new_page()
    sign_in(operator, console_server.admin_key, "/console/admin/accounts")
    for link in ("nav-admin-accounts", "nav-admin-keys", "nav-admin-usage",
                 "nav-admin-system"):
        expect(operator.get_by_test_id(link)).to_be_visible()
    row = operator.locator('tr[data-account="bob"]')
    expect(row.get_by_test_id("account-balance")).to_have_text("5.000000")
    row.get_by_test_id("top-up-amount").fill("2.5")
    row.get_by_test_id("top-up-submit").click()
    expect(operator.locator('tr[data-account="bob"]').get_by_test_id("account-balance")) \
        .to_have_text("7.500000")

    unfold(operator, "#account-form")
    operator.locator("#account-name").fill("carol")
    operator.locator("#account-balance").fill("1.25")
    operator.get_by_test_id("create-account").click()
    expect(operator.locator('tr[data-account="carol"]').get_by_test_id("account-balance")) \
        .to_have_text("1.250000")
    assert console_server.admin("GET", "/accounts/carol")["balance"] == "1.250000"

    owner = new_context().new_page()
    sign_in(owner, key)
    expect(owner.get_by_test_id("balance")).to_have_text("7.500000")
    expect(owner.get_by_test_id("nav-admin-accounts")).to_have_count(0)


def test_the_playground_streams_an_answer_and_its_cost(
        page: Page, console_server: RunningServer) -> None:
    key = console_server.create_key("player", balance="10")
    sign_in(page, key, "/console/playground")
    page.locator("#pg-model").select_option(MODEL)
    page.locator("#pg-user").fill("Count from 1 to 30, separated by spaces.")
    page.locator("#pg-max_tokens").fill("24")
    page.locator("#pg-temperature").fill("0")
    output = page.get_by_test_id("pg-output")
    # Count the answer's updates as they land: a streamed answer grows many times.
    output.evaluate("""node => {
        window.outputUpdates = 0;
        new MutationObserver(() => { window.outputUpdates += 1; })
            .observe(node, {childList: true, characterData: true, subtree: true});
    }""")
    page.get_by_test_id("pg-send").click()
    form = page.locator("#playground-form")
    expect(form).to_have_attribute("data-state", "done", timeout=90_000)
    assert output.inner_text().strip()
    assert page.evaluate("window.outputUpdates") >= 3, "the answer did not stream in"
    cost = page.get_by_test_id("pg-cost").inner_text().strip()
    assert AMOUNT.match(cost) and cost != "0.000000", cost
    assert number(page.get_by_test_id("pg-ttft").inner_text()) > 0
    assert number(page.get_by_test_id("pg-tps").inner_text()) > 0
    expect(page.get_by_test_id("pg-code-python")).to_contain_text("chat.completions.create")
    expect(page.get_by_test_id("pg-code-curl")).to_contain_text("/v1/chat/completions")

    # billed like any client: the same cost in the log
    page.get_by_test_id("nav-log").click()
    record = reload_until(page, page.locator("tr[data-record-id]")).first
    expect(record.locator("td[data-col=cost]")).to_have_text(cost)
    expect(record.locator("td[data-col=model]")).to_contain_text(MODEL)
