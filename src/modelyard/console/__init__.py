"""The web console, served by `modelyard serve` at `/`: server-rendered pages (Jinja
templates, one CSS file, one small script; all shipped in this package, nothing fetched).

`router` holds every page (none of them in the OpenAPI document); `api_caller` lets the
playground's own requests to the public API through with the session cookie and its CSRF
token instead of a Bearer key (api/auth.py).
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import cookie_parser
from starlette.types import Scope

from modelyard.console import sessions
from modelyard.console.admin_pages import router as admin_router
from modelyard.console.assets import router as assets_router
from modelyard.console.pages import router as pages_router
from modelyard.platform.accounts_gate import AccountsGate
from modelyard.platform.gate import Caller, Gate, PlatformError

router = APIRouter(include_in_schema=False)
router.include_router(pages_router)
router.include_router(admin_router)
router.include_router(assets_router)  # last: it ends with the catch-all 404 page


def is_console_path(path: str) -> bool:
    """Paths the console answers itself (it checks its own cookie, not a Bearer key)."""
    return path == "/" or path == "/console" or path.startswith("/console/")


async def api_caller(gate: Gate, scope: Scope) -> Caller | None:
    """The caller of an API request sent by a console page: the session cookie together
    with the session's CSRF token in `X-CSRF-Token` (a header another site's page cannot
    send without CORS, which this server never grants). The key the session signed in
    with is the caller, so the request is billed and limited as that key's."""
    if not isinstance(gate, AccountsGate):
        return None
    cookie = token = None
    for name, value in scope["headers"]:
        if name == b"cookie":
            cookie = cookie_parser(value.decode("latin-1")).get(sessions.COOKIE)
        elif name == sessions.CSRF_HEADER.encode():
            token = value.decode("latin-1")
    if cookie is None or token is None:
        return None
    try:
        session = await sessions.find(gate.db, cookie)
    except (SQLAlchemyError, OSError):
        raise PlatformError(503, "the platform database is unavailable; try again shortly",
                            code="service_unavailable", headers={"Retry-After": "1"}) from None
    if session is None or not session.csrf_ok(token):
        return None
    return session.caller()
