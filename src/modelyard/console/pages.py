"""The account's pages: sign-in and -out, overview, keys, usage (and CSV), request log,
models, playground. Every query is scoped by the session's account id; ids from URLs and
forms are looked up within that account (another account's is a 404).

Every route is kept out of the OpenAPI document (`include_in_schema=False`): these are HTML
pages, not API operations, so tests/adversarial/test_fuzz.py's OPERATIONS does not list
them.
"""

from __future__ import annotations

import csv
import hmac
import io
import secrets
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from modelyard.console import queries, rollup, sessions
from modelyard.console.charts import bars
from modelyard.console.models import catalog
from modelyard.console.sessions import COOKIE, SESSION_HOURS, Session
from modelyard.console.web import (
    SIGN_IN,
    Answer,
    current,
    db_of,
    forbidden,
    form,
    gate_of,
    is_https,
    not_found,
    page,
    render,
    safe_next,
    signed_in,
    state_of,
)
from modelyard.platform import accounts as ops
from modelyard.platform.accounts import AdminError, KeyInfo
from modelyard.platform.gate import PlatformError
from modelyard.platform.money import format_micros

router = APIRouter(include_in_schema=False)
SIGN_IN_COOKIE = "modelyard_sign_in"
USAGE_GROUPS = {"day": "day", "model": "model", "key": "key_id"}


def today() -> date:
    return datetime.now(UTC).date()


@router.get("/")
@router.get("/console")
@page
async def root(request: Request) -> Response:
    return RedirectResponse("/console/", 303)


# -- signing in and out -------------------------------------------------------------------

def _sign_in_page(request: Request, next_path: str, error: str | None = None,
                  status: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "sign_in.html", {"csrf": token, "next": next_path,
                                                "error": error}, status)
    response.set_cookie(SIGN_IN_COOKIE, token, max_age=3600, path=SIGN_IN, httponly=True,
                        samesite="strict", secure=is_https(request))
    return response


@router.get(SIGN_IN)
@page
async def sign_in_page(request: Request) -> Response:
    gate_of(request)
    next_path = safe_next(request.query_params.get("next"))
    if await current(request) is not None:
        return RedirectResponse(next_path, 303)
    return _sign_in_page(request, next_path)


@router.post(SIGN_IN)
@page
async def sign_in(request: Request) -> Response:
    gate = gate_of(request)
    fields = await form(request, None)
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    if not expected or not hmac.compare_digest(fields.get("csrf", "").encode(),
                                               expected.encode()):
        return forbidden(request, None, "This sign-in form has expired; reload the page.")
    next_path = safe_next(fields.get("next"))
    key = fields.get("key", "").strip()
    try:
        caller = await gate.authenticate(f"Bearer {key}")
    except PlatformError as exc:
        message = exc.message if exc.status == 401 else "Signing in failed; try again."
        return _sign_in_page(request, next_path, message, exc.status)
    token, _ = await sessions.create(gate.db, caller)
    response = RedirectResponse(next_path, 303)
    response.set_cookie(COOKIE, token, max_age=SESSION_HOURS * 3600, path="/", httponly=True,
                        samesite="strict", secure=is_https(request))
    response.delete_cookie(SIGN_IN_COOKIE, path=SIGN_IN)
    return response


@router.post("/console/sign-out")
@page
async def sign_out(request: Request) -> Response:
    session = await current(request)
    if session is not None:
        await form(request, session)
        await sessions.end(db_of(request), request.cookies.get(COOKIE, ""))
    response = RedirectResponse(SIGN_IN, 303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=is_https(request))
    return response


# -- overview ------------------------------------------------------------------------------

def _days(first: date, last: date) -> list[str]:
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


async def _totals(request: Request, groups: tuple[rollup.Group, ...], account_id: str | None,
                  since: str | None, until: str | None) -> list[rollup.Totals]:
    gate = gate_of(request)
    state_of(request).run_in_background(
        rollup.roll(gate.db, retention_days=gate.settings.usage_retention_days))
    return await rollup.totals(gate.db, groups, account_id=account_id, since=since,
                               until=until)


@router.get("/console/")
@page
async def overview(request: Request) -> Response:
    session = await signed_in(request)
    account = session.balance
    if account is None:
        raise not_found(request, session, "account")
    now = today()
    first, month = now - timedelta(days=29), now.replace(day=1)
    rows = await _totals(request, ("day", "model"), session.account_id,
                         min(first, month).isoformat(), None)
    days = _days(first, now)
    requests = dict.fromkeys(days, 0)
    tokens = dict.fromkeys(days, 0)
    by_model: dict[str, list[int]] = {}
    spend_today = spend_month = 0
    for row in rows:
        day, model = row.group["day"], row.group["model"]
        if day in requests:
            requests[day] += row.requests
            tokens[day] += row.tokens
            held = by_model.setdefault(model, [0, 0, 0])
            held[0] += row.requests
            held[1] += row.tokens
            held[2] += row.cost
        if day == now.isoformat():
            spend_today += row.cost
        if day >= month.isoformat():
            spend_month += row.cost
    return render(request, "overview.html", {
        "session": session, "nav": "overview", "account": account,
        "spend_today": spend_today, "spend_month": spend_month,
        "requests_chart": bars(list(requests.items()), label="Requests per day, last 30 days",
                               testid="chart-requests"),
        "tokens_chart": bars(list(tokens.items()), label="Tokens per day, last 30 days",
                             testid="chart-tokens"),
        "by_model": sorted(by_model.items(), key=lambda item: -item[1][2]),
        "days": [(day, requests[day], tokens[day]) for day in reversed(days)]})


# -- keys ------------------------------------------------------------------------------------

def _key_status(key: KeyInfo) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= datetime.now(UTC).replace(tzinfo=None):
        return "expired"
    return "active"


async def _keys_page(request: Request, session: Session, *, created: str | None = None,
                     error: str | None = None, values: dict[str, str] | None = None,
                     status: int = 200) -> Response:
    found = await queries.keys(db_of(request), session.account_id)
    return render(request, "keys.html", {
        "session": session, "nav": "keys", "keys": [(k, _key_status(k)) for k in found],
        "created": created, "error": error, "values": values or {},
        "model_ids": [m.id for m in catalog(request, session)]}, status)


@router.get("/console/keys")
@page
async def keys_page(request: Request) -> Response:
    return await _keys_page(request, await signed_in(request))


def _limit(value: str, what: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= ops.MAX_LIMIT:
        raise AdminError(422, f"{what} must be a whole number from 1 to {ops.MAX_LIMIT}")
    return int(value)


def _within(asked: int | None, held: int | None, what: str) -> int | None:
    """A new key's limit: never looser than the signed-in key's own."""
    if held is None:
        return asked
    if asked is not None and asked > held:
        raise AdminError(422, f"{what} may be at most {held}, the limit of the key you "
                              "signed in with")
    return held if asked is None else asked


@router.post("/console/keys")
@page
async def create_key(request: Request) -> Response:
    """A key of the session's account, never an admin key, and never beyond what the
    signed-in key may do itself (its models, rate limits, concurrency and expiry), so a
    restricted key cannot mint itself an unrestricted one."""
    session = await signed_in(request)
    fields = await form(request, session)
    try:
        models = [m.strip() for m in fields.get("models", "").split(",") if m.strip()]
        if session.models is not None:
            outside = sorted(set(models) - session.models)
            if outside:
                raise AdminError(422, f"the key you signed in with may not use "
                                      f"{', '.join(outside)}")
            models = models or sorted(session.models)
        expires = fields.get("expires", "").strip()
        expires_at = ops.parse_when(expires, what="expires") if expires else None
        if session.key_expires_at is not None:
            if expires_at is not None and expires_at > session.key_expires_at:
                raise AdminError(422, "a new key may not outlive the key you signed in with")
            expires_at = expires_at or session.key_expires_at
        created = await ops.create_key(
            db_of(request), session.account, models=models or None,
            rpm=_within(_limit(fields.get("rpm", ""), "RPM"), session.rpm, "RPM"),
            tpm=_within(_limit(fields.get("tpm", ""), "TPM"), session.tpm, "TPM"),
            max_concurrent=session.max_concurrent, expires_at=expires_at,
            name=fields.get("name") or None)
    except AdminError as exc:
        return await _keys_page(request, session, error=exc.message, values=fields,
                                status=422)
    return await _keys_page(request, session, created=created.text)


@router.post("/console/keys/{key_id}/revoke")
@page
async def revoke_key(request: Request, key_id: str) -> Response:
    session = await signed_in(request)
    await form(request, session)
    if await queries.revoke(db_of(request), key_id, session.account_id) is None:
        raise not_found(request, session, "key")
    return RedirectResponse("/console/keys", 303)


# -- usage -----------------------------------------------------------------------------------

def _day_param(request: Request, name: str, default: date) -> str:
    try:
        return date.fromisoformat(request.query_params.get(name) or default.isoformat()
                                  ).isoformat()
    except ValueError:
        return default.isoformat()


def usage_filter(request: Request, groups: dict[str, str]) -> tuple[str, str, str]:
    """(by, since, until) from the query, defaults the last 30 days by day."""
    by = request.query_params.get("by", "day")
    if by not in groups:
        by = "day"
    until = _day_param(request, "until", today())
    since = _day_param(request, "since", date.fromisoformat(until) - timedelta(days=29))
    return by, since, until


def sort_totals(rows: list[rollup.Totals], column: str) -> list[rollup.Totals]:
    if column == "day":
        return sorted(rows, key=lambda row: row.group[column])
    return sorted(rows, key=lambda row: (-row.cost, row.group[column]))


async def usage_rows(request: Request, account_id: str | None, groups: dict[str, str]
                     ) -> tuple[str, str, str, list[rollup.Totals], dict[str, str]]:
    by, since, until = usage_filter(request, groups)
    column: Any = groups[by]
    rows = sort_totals(await _totals(request, (column,), account_id, since, until), column)
    names: dict[str, str] = {}
    if column == "key_id":
        names = {k.id: k.name or "" for k in await queries.keys(db_of(request), account_id)}
    elif column == "account_id":
        names = {a.id: a.name for a in await ops.list_accounts(db_of(request))}
    return by, since, until, rows, names


@router.get("/console/usage")
@page
async def usage_page(request: Request) -> Response:
    session = await signed_in(request)
    by, since, until, rows, names = await usage_rows(request, session.account_id,
                                                     USAGE_GROUPS)
    return render(request, "usage.html", {
        "session": session, "nav": "usage", "by": by, "since": since, "until": until,
        "rows": rows, "column": USAGE_GROUPS[by], "names": names, "groups": USAGE_GROUPS,
        "csv_path": "/console/usage.csv", "action": "/console/usage"})


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def usage_csv(by: str, column: str, since: str, until: str, rows: list[rollup.Totals],
              names: dict[str, str]) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([by, "name", "requests", "prompt_tokens", "cached_tokens",
                     "completion_tokens", "reasoning_tokens", "cost", "uncollected"])
    for row in rows:
        group = row.group[column]
        writer.writerow([_cell(group), _cell(names.get(group, "")), row.requests,
                         row.prompt_tokens, row.cached_tokens, row.completion_tokens,
                         row.reasoning_tokens, format_micros(row.cost),
                         format_micros(row.uncollected)])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="usage-{by}-{since}-{until}.csv"'})


@router.get("/console/usage.csv")
@page
async def usage_export(request: Request) -> Response:
    session = await signed_in(request)
    by, since, until, rows, names = await usage_rows(request, session.account_id,
                                                     USAGE_GROUPS)
    return usage_csv(by, USAGE_GROUPS[by], since, until, rows, names)


# -- request log, models, playground ---------------------------------------------------------

@router.get("/console/log")
@page
async def log_page(request: Request) -> Response:
    session = await signed_in(request)
    raw = request.query_params.get("before", "")
    before = int(raw) if raw.isdigit() and len(raw) < 19 else None
    rows = await queries.records(db_of(request), session.account_id, before,
                                 queries.LOG_PAGE + 1)
    more = len(rows) > queries.LOG_PAGE
    rows = rows[:queries.LOG_PAGE]
    names = {k.id: k.name or "" for k in await queries.keys(db_of(request),
                                                             session.account_id)}
    return render(request, "log.html", {
        "session": session, "nav": "log", "rows": rows, "names": names,
        "next_before": rows[-1].id if more and rows else None, "first_page": before is None})


@router.get("/console/models")
@page
async def models_page(request: Request) -> Response:
    session = await signed_in(request)
    return render(request, "models.html", {
        "session": session, "nav": "models", "models": catalog(request, session)})


@router.get("/console/playground")
@page
async def playground_page(request: Request) -> Response:
    session = await signed_in(request)
    models = [m for m in catalog(request, session) if m.chat]
    host = request.headers.get("x-forwarded-host") or request.headers.get("host", "localhost")
    return render(request, "playground.html", {
        "session": session, "nav": "playground", "models": models,
        "origin": f"{'https' if is_https(request) else 'http'}://{host}"})


__all__ = ["Answer", "router"]
