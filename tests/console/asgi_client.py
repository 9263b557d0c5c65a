"""A browser at the ASGI level: its own cookie jar, signing in through the form."""

from __future__ import annotations

import re

import httpx

from tests.platform.harness import Harness

_CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def browser(platform: Harness, base_url: str = "http://testserver",
            **headers: str) -> httpx.AsyncClient:
    """A client of the same app with a cookie jar of its own."""
    return httpx.AsyncClient(transport=platform.client._transport, base_url=base_url,
                             headers=headers)


def form_token(html: str) -> str:
    found = _CSRF_FIELD.search(html)
    assert found is not None, html
    return found.group(1)


def page_token(html: str) -> str:
    found = _CSRF_META.search(html)
    assert found is not None, html
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, key: str) -> str:
    """Sign in with `key`; the session's CSRF token."""
    page = await client.get("/console/sign-in")
    assert page.status_code == 200
    answer = await client.post("/console/sign-in", data={"csrf": form_token(page.text),
                                                         "key": key})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/console/"
    overview = await client.get("/console/")
    assert overview.status_code == 200, overview.text
    return page_token(overview.text)
