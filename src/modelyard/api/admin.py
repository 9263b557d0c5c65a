"""The admin API under /admin/: accounts, top-ups, keys, usage. Admin keys only.

The same operations as the `modelyard accounts|keys|usage` commands (both call
`modelyard.platform.accounts` and `.usage`). Amounts are decimal strings in currency units
with six decimals, and micro-units alongside (`*_micros`); times are UTC ISO 8601.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from datetime import datetime
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from sqlalchemy.exc import SQLAlchemyError

from modelyard.api.errors import APIError, from_validation_error
from modelyard.api.openapi import request_body
from modelyard.api.routes import json_response
from modelyard.api.state import AppState
from modelyard.platform import accounts as ops
from modelyard.platform import usage
from modelyard.platform.accounts import Account, AdminError, KeyInfo
from modelyard.platform.accounts_gate import AccountsGate
from modelyard.platform.database import Database
from modelyard.platform.gate import Caller
from modelyard.platform.money import AmountError, format_micros, to_micros
from modelyard.platform.usage import GROUPINGS, UsageRow, UsageTotals

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/admin")
T = TypeVar("T")
Model = TypeVar("Model", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Amount = StrictStr | StrictInt | StrictFloat
"""Currency units: decimal text (`"12.5"`) or a JSON number; bounds in `money.to_micros`."""


class NewAccount(_Body):
    name: str = Field(min_length=1, max_length=200)
    balance: Amount = "0"
    weight: StrictInt | StrictFloat | None = None
    """Its fair share of the built-in engines against other accounts' (None: 1)."""


class TopUp(_Body):
    amount: Amount


class Weight(_Body):
    weight: StrictInt | StrictFloat


class NewKey(_Body):
    account: str
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    priority: int | None = None
    """Its requests' place among its account's waiting for an engine (higher first)."""
    expires: str | None = None
    name: str | None = Field(default=None, max_length=200)
    admin: bool = False


def _database(request: Request) -> Database:
    caller: Caller = request.state.caller
    if not caller.is_admin:
        raise APIError(403, "this API needs an admin key", code="permission_denied")
    state: AppState = request.app.state.modelyard
    if not isinstance(state.gate, AccountsGate):
        raise APIError(404, "this server runs without accounts", code="not_found")
    return state.gate.db


async def _body(request: Request, model: type[Model]) -> Model:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def _run(operation: Awaitable[T]) -> T:
    try:
        return await operation
    except (SQLAlchemyError, OSError) as exc:
        logger.error("admin operation failed on the platform database: %s", exc)
        raise APIError(503, "the platform database is unavailable; try again shortly",
                       code="service_unavailable", headers={"Retry-After": "1"}) from None


def _micros(value: str | int | float, what: str) -> int:
    try:
        return to_micros(value, what=what)
    except AmountError as exc:
        raise APIError(422, str(exc), param=what, code="invalid_value") from None


def _when(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        return ops.parse_when(value, what=what)
    except AdminError as exc:
        raise APIError(422, exc.message, param=what, code="invalid_value") from None


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


def account_json(account: Account) -> dict[str, Any]:
    amounts = {"balance": account.balance, "reserved": account.reserved,
               "available": account.available, "credited": account.credited,
               "spent": account.spent}
    return {"object": "account", "id": account.id, "name": account.name,
            **{name: format_micros(value) for name, value in amounts.items()},
            **{f"{name}_micros": value for name, value in amounts.items()},
            "weight": account.weight, "created_at": _time(account.created_at)}


def key_json(key: KeyInfo) -> dict[str, Any]:
    return {"object": "api_key", "id": key.id, "account": key.account,
            "account_id": key.account_id, "name": key.name, "admin": key.is_admin,
            "models": None if key.models is None else list(key.models), "rpm": key.rpm,
            "tpm": key.tpm, "max_concurrent": key.max_concurrent, "priority": key.priority,
            "expires_at": _time(key.expires_at), "revoked_at": _time(key.revoked_at),
            "created_at": _time(key.created_at)}


def totals_json(row: UsageTotals) -> dict[str, Any]:
    return {"group": row.group, "requests": row.requests, **row.usage.as_json(),
            "cost": format_micros(row.cost),
            "cost_micros": row.cost, "uncollected": format_micros(row.uncollected),
            "uncollected_micros": row.uncollected}


def record_json(row: UsageRow) -> dict[str, Any]:
    return {"id": row.id, "created_at": _time(row.created_at), "key_id": row.key_id,
            "account_id": row.account_id, "model": row.model, "user": row.user,
            **row.usage.as_json(), "cost": format_micros(row.cost),
            "cost_micros": row.cost, "reserved_micros": row.reserved,
            "uncollected": format_micros(row.uncollected),
            "uncollected_micros": row.uncollected, "degraded": row.degraded,
            "latency_ms": row.latency_ms, "ttft_ms": row.ttft_ms, "status": row.status,
            "estimated": row.usage.estimated, "client_disconnected": row.client_disconnected}


def _listing(data: list[dict[str, Any]]) -> Response:
    return json_response({"object": "list", "data": data})


@router.get("/accounts")
async def list_accounts(request: Request) -> Response:
    found = await _run(ops.list_accounts(_database(request)))
    return _listing([account_json(a) for a in found])


@router.post("/accounts", openapi_extra=request_body(NewAccount))
async def create_account(request: Request) -> Response:
    db = _database(request)
    body = await _body(request, NewAccount)
    account = await _run(ops.create_account(db, body.name, _micros(body.balance, "balance"),
                                            None if body.weight is None
                                            else float(body.weight)))
    return json_response(account_json(account), 201)


@router.get("/accounts/{name}")
async def get_account(request: Request, name: str) -> Response:
    return json_response(account_json(await _run(ops.get_account(_database(request), name))))


@router.post("/accounts/{name}/topup", openapi_extra=request_body(TopUp))
async def top_up(request: Request, name: str) -> Response:
    db = _database(request)
    body = await _body(request, TopUp)
    account = await _run(ops.top_up(db, name, _micros(body.amount, "amount")))
    return json_response(account_json(account))


@router.post("/accounts/{name}/weight", openapi_extra=request_body(Weight))
async def set_weight(request: Request, name: str) -> Response:
    """An account's fair-share weight (see engine/fair_share.py)."""
    db = _database(request)
    body = await _body(request, Weight)
    return json_response(account_json(await _run(ops.set_weight(db, name,
                                                                  float(body.weight)))))


@router.get("/keys")
async def list_keys(request: Request, account: str | None = None) -> Response:
    found = await _run(ops.list_keys(_database(request), account))
    return _listing([key_json(k) for k in found])


@router.post("/keys", openapi_extra=request_body(NewKey))
async def create_key(request: Request) -> Response:
    db = _database(request)
    body = await _body(request, NewKey)
    expires = _when(body.expires, "expires")
    created = await _run(ops.create_key(db, body.account, models=body.models, rpm=body.rpm,
                                        tpm=body.tpm, expires_at=expires, name=body.name,
                                        is_admin=body.admin,
                                        max_concurrent=body.max_concurrent,
                                        priority=body.priority))
    return json_response({**key_json(created.info), "key": created.text}, 201)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> Response:
    return json_response(key_json(await _run(ops.revoke_key(_database(request), key_id))))


@router.get("/usage")
async def usage_totals(request: Request, by: str = "day", since: str | None = None,
                       account: str | None = None) -> Response:
    db = _database(request)
    grouping = next((g for g in GROUPINGS if g == by), None)
    if grouping is None:
        raise APIError(422, f"by must be one of {', '.join(GROUPINGS)}", param="by",
                       code="invalid_value")
    rows = await _run(usage.totals(db, grouping, since=_when(since, "since"), account=account))
    return _listing([totals_json(r) for r in rows])


@router.get("/usage/records")
async def usage_records(request: Request, account: str | None = None,
                        key: str | None = None, since: str | None = None,
                        limit: int = 100) -> Response:
    db = _database(request)
    rows = await _run(usage.records(db, account=account, key_id=key, since=_when(since, "since"),
                                    limit=max(1, min(limit, 10_000))))
    return _listing([record_json(r) for r in rows])

