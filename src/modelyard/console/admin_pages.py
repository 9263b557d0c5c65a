"""Operator pages (a session signed in with an admin key): accounts (create, top up),
every key, usage across accounts, deployments and the engine refreshed live.

Kept out of the OpenAPI document like every console page (`include_in_schema=False`).
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from modelyard.console import queries
from modelyard.console.live import OUTCOMES, snapshot
from modelyard.console.pages import USAGE_GROUPS, usage_csv, usage_rows
from modelyard.console.sessions import Session
from modelyard.console.web import (
    current,
    db_of,
    form,
    not_found,
    page,
    render,
    signed_in,
    state_of,
)
from modelyard.platform import accounts as ops
from modelyard.platform.accounts import AdminError
from modelyard.platform.money import AmountError, to_micros

router = APIRouter(prefix="/console/admin", include_in_schema=False)
ADMIN_GROUPS = {**USAGE_GROUPS, "account": "account_id"}


async def _accounts_page(request: Request, session: Session, error: str | None = None,
                         status: int = 200) -> Response:
    found = await ops.list_accounts(db_of(request))
    return render(request, "admin_accounts.html", {
        "session": session, "nav": "admin-accounts", "accounts": found, "error": error},
        status)


@router.get("/accounts")
@page
async def accounts_page(request: Request) -> Response:
    return await _accounts_page(request, await signed_in(request, operator=True))


@router.post("/accounts")
@page
async def create_account(request: Request) -> Response:
    session = await signed_in(request, operator=True)
    fields = await form(request, session)
    try:
        balance = to_micros(fields.get("balance", "").strip() or "0", what="balance")
        await ops.create_account(db_of(request), fields.get("name", ""), balance)
    except (AdminError, AmountError) as exc:
        return await _accounts_page(request, session, str(exc), 422)
    return RedirectResponse("/console/admin/accounts", 303)


@router.post("/accounts/{account_id}/top-up")
@page
async def top_up(request: Request, account_id: str) -> Response:
    session = await signed_in(request, operator=True)
    fields = await form(request, session)
    account = await queries.account(db_of(request), account_id)
    if account is None:
        raise not_found(request, session, "account")
    try:
        amount = to_micros(fields.get("amount", "").strip(), what="amount")
        await ops.top_up(db_of(request), account.name, amount, note="top-up (console)")
    except (AdminError, AmountError) as exc:
        return await _accounts_page(request, session, str(exc), 422)
    return RedirectResponse("/console/admin/accounts", 303)


@router.get("/keys")
@page
async def keys_page(request: Request) -> Response:
    session = await signed_in(request, operator=True)
    found = await queries.keys(db_of(request), None)
    return render(request, "admin_keys.html", {
        "session": session, "nav": "admin-keys", "keys": found})


@router.post("/keys/{key_id}/revoke")
@page
async def revoke_key(request: Request, key_id: str) -> Response:
    session = await signed_in(request, operator=True)
    await form(request, session)
    if await queries.revoke(db_of(request), key_id, None) is None:
        raise not_found(request, session, "key")
    return RedirectResponse("/console/admin/keys", 303)


@router.get("/usage")
@page
async def usage_page(request: Request) -> Response:
    session = await signed_in(request, operator=True)
    by, since, until, rows, names = await usage_rows(request, None, ADMIN_GROUPS)
    return render(request, "usage.html", {
        "session": session, "nav": "admin-usage", "by": by, "since": since, "until": until,
        "rows": rows, "column": ADMIN_GROUPS[by], "names": names, "groups": ADMIN_GROUPS,
        "csv_path": "/console/admin/usage.csv", "action": "/console/admin/usage"})


@router.get("/usage.csv")
@page
async def usage_export(request: Request) -> Response:
    await signed_in(request, operator=True)
    by, since, until, rows, names = await usage_rows(request, None, ADMIN_GROUPS)
    return usage_csv(by, ADMIN_GROUPS[by], since, until, rows, names)


@router.get("/system")
@page
async def system_page(request: Request) -> Response:
    session = await signed_in(request, operator=True)
    return render(request, "admin_system.html", {
        "session": session, "nav": "admin-system", "outcomes": OUTCOMES,
        "live": snapshot(state_of(request).registry)})


@router.get("/live.json")
@page
async def live(request: Request) -> Response:
    session = await current(request)
    if session is None or not session.is_admin:
        return Response(b'{"error":"sign in with an admin key"}', 401 if session is None
                        else 403, media_type="application/json")
    return Response(orjson.dumps(snapshot(state_of(request).registry)),
                    media_type="application/json")
