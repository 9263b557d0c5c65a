"""Steps the browser tests share: signing in, reading the CSRF token, waiting for records."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import openai

from modelyard.platform.keys import key_id_of
from tests.e2e.server import RunningServer

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

MODEL = "qwen2.5-coder-0.5b-instruct"
HELLO = [{"role": "user", "content": "Say hi."}]
AMOUNT = re.compile(r"^-?\d+\.\d{6}$")
"""A money amount as the console shows it: currency units with six decimals."""


def key_id(key: str) -> str:
    found = key_id_of(key)
    assert found is not None, "not a modelyard key"
    return found


def units(micros: int) -> str:
    """Micro-units as the console shows them: 1500000 -> "1.500000"."""
    whole, fraction = divmod(micros, 1_000_000)
    return f"{whole}.{fraction:06d}"


def number(shown: str) -> float:
    """The first number in a text such as "123 ms" or "45.6 tokens/s"."""
    found = re.search(r"\d+(?:\.\d+)?", shown)
    assert found is not None, f"no number in {shown!r}"
    return float(found.group())


def sign_in(page: Page, key: str, path: str = "/console/") -> None:
    """Open `path` signed out (the console sends the browser to sign in), sign in with
    `key`, and land back on `path`."""
    page.goto(path)
    assert "/console/sign-in" in page.url, page.url
    page.locator("#key").fill(key)
    page.get_by_test_id("sign-in-submit").click()
    page.wait_for_url(f"**{path}")
    assert page.locator("main#main").is_visible()


def unfold(page: Page, form: str) -> None:
    """Unfold the panel that holds `form` (a selector), such as the keys page's "Create a
    key" (folded once the account has keys)."""
    panel = page.locator(f"details:has({form})")
    if panel.get_attribute("open") is None:
        panel.locator("summary").click()


def csrf_token(page: Page) -> str:
    """The session's CSRF token, as the signed-in page carries it."""
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token, "no CSRF token on the page"
    return token


def sdk(server: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0, timeout=120)


def ask(server: RunningServer, key: str, max_tokens: int = 8) -> openai.types.CompletionUsage:
    """One short chat completion with `key`; its usage."""
    with sdk(server, key) as client:
        answer = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=max_tokens)  # type: ignore[arg-type]
    assert answer.usage is not None
    return answer.usage


def reload_until(page: Page, locator: Locator, seconds: float = 30.0) -> Locator:
    """Reload the page until `locator` finds something (a usage record is written just
    after its response); the locator."""
    deadline = time.monotonic() + seconds
    while locator.count() == 0:
        assert time.monotonic() < deadline, f"nothing matched {locator} on {page.url}"
        time.sleep(0.2)
        page.reload()
    return locator
