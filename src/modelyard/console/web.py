"""What every console page shares: templates, security headers, the session, forms.

Pages answer HTML only: a page that cannot be shown raises `Answer` with the response to
send instead (a redirect to sign in, a 403 or 404 page), which the `page` decorator sends.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, ParamSpec
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from modelyard.api.state import AppState
from modelyard.console import sessions
from modelyard.console.sessions import COOKIE, Session
from modelyard.errors import ModelyardError
from modelyard.platform.accounts_gate import AccountsGate
from modelyard.platform.database import Database
from modelyard.platform.money import format_micros

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store"}
SIGN_IN = "/console/sign-in"
MAX_FORM_BYTES = 64 * 1024
P = ParamSpec("P")

templates = Environment(loader=PackageLoader("modelyard.console", "templates"),
                        autoescape=select_autoescape(default=True), trim_blocks=True,
                        lstrip_blocks=True)
templates.filters["money"] = format_micros


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


templates.filters["when"] = _when


class Answer(ModelyardError):
    """Send this response instead of the page (a sign-in redirect, a 403 or 404 page):
    caught by the console's route wrapper, never by the API's error handlers."""

    def __init__(self, response: Response) -> None:
        super().__init__("console answer", status=response.status_code)
        self.response = response


def page(handler: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
    """A console route: an `Answer` raised inside is sent; every answer carries the
    security headers."""
    @functools.wraps(handler)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> Response:
        try:
            response = await handler(*args, **kwargs)
        except Answer as answer:
            response = answer.response
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response
    return wrapped


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.modelyard
    return state


def gate_of(request: Request) -> AccountsGate:
    gate = state_of(request).gate
    if not isinstance(gate, AccountsGate):
        raise Answer(render(request, "message.html", {
            "title": "No accounts", "message": "This server runs without accounts, so "
            "there is nothing to sign in to."}, status=404))
    return gate


def db_of(request: Request) -> Database:
    return gate_of(request).db


def render(request: Request, template: str, context: dict[str, Any],
           status: int = 200) -> HTMLResponse:
    html = templates.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status)


def is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path of this server, nothing else."""
    if value and value.startswith("/console/") and "//" not in value and "\\" not in value \
            and all(0x20 < ord(char) < 0x7F for char in value):
        return value
    return "/console/"


def to_sign_in(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{SIGN_IN}?next={quote(safe_next(target), safe='/')}", 303)


async def current(request: Request) -> Session | None:
    return await sessions.find(db_of(request), request.cookies.get(COOKIE))


async def signed_in(request: Request, *, operator: bool = False) -> Session:
    """The page's session; a browser without one is sent to sign in, an account on an
    operator page gets a 403."""
    session = await current(request)
    if session is None:
        raise Answer(to_sign_in(request))
    if operator and not session.is_admin:
        raise Answer(render(request, "message.html", {
            "session": session, "title": "Operators only",
            "message": "This page needs an admin key."}, status=403))
    return session


def not_found(request: Request, session: Session, what: str) -> Answer:
    return Answer(render(request, "message.html", {
        "session": session, "title": "Not found", "message": f"There is no such {what}."},
        status=404))


async def form(request: Request, session: Session | None) -> dict[str, str]:
    """A POSTed form's fields (the first value of each), refused with a 403 unless it
    carries the session's CSRF token and, when the browser says where it came from, comes
    from this server."""
    origin = request.headers.get("origin")
    hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
    if origin is not None and urlsplit(origin).netloc not in hosts:
        raise Answer(forbidden(request, session, "This form came from another site."))
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Answer(forbidden(request, session, "This form is too large."))
    fields = {name: values[0] for name, values in
              parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
    if session is not None and not session.csrf_ok(fields.get("csrf")):
        raise Answer(forbidden(request, session, "This form has expired; reload the page "
                                                 "and send it again."))
    return fields


def forbidden(request: Request, session: Session | None, message: str) -> Response:
    return render(request, "message.html", {"session": session, "title": "Refused",
                                            "message": message}, status=403)
