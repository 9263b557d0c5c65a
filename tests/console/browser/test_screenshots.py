"""Screenshots of the console's main pages for the README, at desktop (1280 px) and phone
(360 px) widths, into docs/console/. Opt-in, not a check: they are taken only with
MODELYARD_SCREENSHOTS=1:

    MODELYARD_SCREENSHOTS=1 python -m pytest tests/console/browser/test_screenshots.py

The account shown has two weeks of history (records written into the server's database
beside a few real requests), so the charts and tables have something to show; the server
has a catalog model served by the engine and by an upstream deployment that is down, so
the operator's deployments page has a breaker to show.
"""

from __future__ import annotations

import os
import random
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from modelyard.config import DEFAULT_EMBEDDING_ID
from tests.console.browser.conftest import SERVER_CONFIG, TIMEOUT_MS
from tests.console.browser.console import MODEL, ask, key_id, sdk, sign_in
from tests.e2e.server import RunningServer, free_port, running_server

expect = pytest.importorskip("playwright.sync_api").expect

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.skipif(os.environ.get("MODELYARD_SCREENSHOTS") != "1",
                                reason="screenshots are taken with MODELYARD_SCREENSHOTS=1")

DOCS = Path(__file__).resolve().parents[3] / "docs" / "console"
WIDTHS = {"desktop": (1280, 860), "phone": (360, 780)}
ACCOUNT_PAGES = {"overview": "/console/", "keys": "/console/keys",
                 "usage": "/console/usage?by=model", "log": "/console/log",
                 "models": "/console/models"}
OPERATOR_PAGES = {"accounts": "/console/admin/accounts", "deployments": "/console/admin/system"}
MIXED = "coder"
SCREENSHOT_CONFIG = SERVER_CONFIG + f"""
[[models]]
id = "{MIXED}"
input_price = 1
output_price = 2

[[models.deployments]]
kind = "local"
name = "engine"

[[models.deployments]]
base_url = "http://127.0.0.1:{free_port()}/v1"
upstream_model = "qwen2.5-coder-32b-instruct"
profile = "vllm"
name = "gpu-box-1"
"""
"""The conftest's server, plus a catalog model on the engine and on an upstream that is
down (nothing listens at its port)."""
HISTORY_MODELS = ((MODEL, 1, 2), (DEFAULT_EMBEDDING_ID, 1, 0))
"""(model, micro-units per prompt token, per completion token), as the server prices them."""


def backfill(server: RunningServer, account_id: str, key_ids: list[str], days: int = 14,
             seed: int = 3) -> None:
    """Usage records of the last `days` days, straight into the server's database (SQLite,
    WAL: the running server keeps going)."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = []
    for day in range(days, 0, -1):
        for _ in range(rng.randrange(8, 30) + 3 * (days - day)):
            model, input_price, output_price = rng.choice(HISTORY_MODELS[:1] * 3
                                                          + HISTORY_MODELS[1:])
            prompt = rng.randrange(20, 900)
            completion = rng.randrange(5, 400) if output_price else 0
            cached = prompt // 2 if rng.random() < 0.3 else 0
            when = now - timedelta(days=day, seconds=rng.randrange(86_400))
            rows.append((when.isoformat(sep=" "), rng.choice(key_ids), account_id, model,
                         prompt, cached, completion, 0,
                         prompt * input_price + completion * output_price, 0,
                         rng.uniform(200, 4000),
                         rng.uniform(30, 300) if output_price else None, 200, 0,
                         int(rng.random() < 0.03), secrets.token_hex(16)))
    rows.sort()
    database = server.log_path.parent / "platform.db"
    with sqlite3.connect(database, timeout=10) as connection:
        connection.executemany(
            "INSERT INTO usage (created_at, key_id, account_id, model, prompt_tokens, "
            "cached_tokens, completion_tokens, reasoning_tokens, cost, reserved, latency_ms, "
            "ttft_ms, status, estimated, client_disconnected, settlement_id, uncollected, "
            "degraded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)", rows)


@pytest.fixture(scope="module")
def shown_server(data_dir: Path, default_model_path: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(data_dir, SCREENSHOT_CONFIG,
                        tmp_path_factory.mktemp("screenshot-server")) as running:
        yield running


def shoot(page: Page, name: str, desktop_height: int = 860) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    for width_name, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width,
                                "height": desktop_height if width_name == "desktop" else height})
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(150)
        page.screenshot(path=str(DOCS / f"{name}-{width_name}.png"))


def test_screenshots_of_the_main_pages(browser: Browser, shown_server: RunningServer) -> None:
    console_server = shown_server
    contexts = []

    def new_page() -> Page:
        context = browser.new_context(base_url=console_server.base_url)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        return context.new_page()

    try:
        take(console_server, new_page)
    finally:
        for context in contexts:
            context.close()


def take(console_server: RunningServer, new_page: Callable[[], Page]) -> None:
    key = console_server.create_key("acme", balance="25", name="production")
    second = console_server.create_key("acme", name="staging", rpm=60)
    account_id = console_server.admin("GET", "/accounts/acme")["id"]
    backfill(console_server, account_id, [key_id(key), key_id(second)])
    for used in (key, key, second):
        ask(console_server, used, max_tokens=24)
    with sdk(console_server, key) as client:  # the upstream fails, the engine answers
        for _ in range(6):
            client.chat.completions.create(model=MIXED, max_tokens=8, messages=[
                {"role": "user", "content": "Say hi."}])

    page = new_page()
    sign_in(page, key)
    for name, path in ACCOUNT_PAGES.items():
        page.set_viewport_size({"width": 1280, "height": 860})
        page.goto(path)
        shoot(page, name)

    page.goto("/console/playground")
    page.locator("#pg-model").select_option(MODEL)
    page.locator("#pg-system").fill("You are a concise assistant.")
    page.locator("#pg-user").fill("Write a Python one-liner that reverses a string.")
    page.locator("#pg-max_tokens").fill("64")
    page.get_by_test_id("pg-send").click()
    expect(page.locator("#playground-form")).to_have_attribute("data-state", "done",
                                                               timeout=90_000)
    shoot(page, "playground", desktop_height=1200)

    operator = new_page()
    sign_in(operator, console_server.admin_key, "/console/admin/accounts")
    for name, path in OPERATOR_PAGES.items():
        operator.set_viewport_size({"width": 1280, "height": 860})
        operator.goto(path)
        operator.wait_for_timeout(300)
        shoot(operator, f"admin-{name}")
    assert len(list(DOCS.glob("*.png"))) >= 2 * (len(ACCOUNT_PAGES) + 1 + len(OPERATOR_PAGES))
