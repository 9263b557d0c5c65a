"""`modelyard accounts|keys|usage`: the admin operations on the command line.

They open the same database as `modelyard serve` with the same config (`--config`,
`MODELYARD_DATA_DIR`, `MODELYARD_DATABASE_URL`), so they work while servers run, and on a
database no server has used yet (it is migrated first). Amounts are currency units with up
to six decimals. `--json` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from modelyard.config import load_config
from modelyard.platform import accounts as ops
from modelyard.platform import service, usage
from modelyard.platform.accounts import Account, KeyInfo
from modelyard.platform.database import Database
from modelyard.platform.money import format_micros, to_micros
from modelyard.platform.usage import GROUPINGS

Handler = Callable[[Database, argparse.Namespace], Awaitable[str]]


def add_commands(commands: Any) -> None:
    """Register the subcommands on the top-level parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="a TOML config file (as for serve)")
    common.add_argument("--json", action="store_true", help="print JSON")

    accounts = commands.add_parser("accounts", help="prepaid accounts").add_subparsers(
        dest="action", required=True)
    create = accounts.add_parser("create", parents=[common], help="create an account")
    create.add_argument("name")
    create.add_argument("--balance", default="0", help="initial balance (default 0)")
    create.add_argument("--weight", type=float,
                        help="its fair share of the built-in engines (default 1)")
    create.set_defaults(handler=_create_account)
    weight = accounts.add_parser("weight", parents=[common],
                                 help="set an account's fair-share weight")
    weight.add_argument("name")
    weight.add_argument("weight", type=float)
    weight.set_defaults(handler=_set_weight)
    topup = accounts.add_parser("topup", parents=[common], help="add to an account's balance")
    topup.add_argument("name")
    topup.add_argument("amount")
    topup.set_defaults(handler=_top_up)
    listing = accounts.add_parser("list", parents=[common], help="list accounts")
    listing.set_defaults(handler=_list_accounts)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="action",
                                                                      required=True)
    new = keys.add_parser("create", parents=[common], help="create a key (shown once)")
    new.add_argument("--account", required=True)
    new.add_argument("--models", help="comma-separated model ids the key may use (default all)")
    new.add_argument("--rpm", type=int, help="requests per minute")
    new.add_argument("--tpm", type=int, help="tokens (prompt + max_tokens) per minute")
    new.add_argument("--max-concurrent", type=int,
                     help="requests in flight at once (default: [platform] "
                          "max_concurrent_per_key)")
    new.add_argument("--priority", type=int,
                     help="its requests' place among its account's waiting for an engine "
                          "(higher first; default 0)")
    new.add_argument("--expires", help="expiry: a date or ISO time, UTC")
    new.add_argument("--name", help="a label")
    new.add_argument("--admin", action="store_true", help="an admin key")
    new.set_defaults(handler=_create_key)
    key_list = keys.add_parser("list", parents=[common], help="list keys")
    key_list.add_argument("--account")
    key_list.set_defaults(handler=_list_keys)
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key, effective at once")
    revoke.add_argument("id")
    revoke.set_defaults(handler=_revoke_key)

    report = commands.add_parser("usage", parents=[common], help="usage and cost totals")
    report.add_argument("--by", choices=GROUPINGS, default="day")
    report.add_argument("--since", help="a date or ISO time, UTC")
    report.add_argument("--account")
    report.set_defaults(handler=_usage)


def run(args: argparse.Namespace) -> int:
    """Run a platform subcommand; raises AdminError, AmountError or PlatformUnavailable."""
    config = load_config(args.config)
    handler: Handler = args.handler

    async def main() -> str:
        await service.prepare(config)
        db = service.open_database(config)
        try:
            return await handler(db, args)
        finally:
            await db.close()

    print(asyncio.run(main()))
    return 0


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row]
                                           for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def _account_json(account: Account) -> dict[str, Any]:
    return {"id": account.id, "name": account.name, "balance": format_micros(account.balance),
            "reserved": format_micros(account.reserved), "spent": format_micros(account.spent),
            "credited": format_micros(account.credited), "weight": account.weight,
            "created_at": _when(account.created_at)}


def _accounts_out(found: list[Account], as_json: bool) -> str:
    if as_json:
        return json.dumps([_account_json(a) for a in found], indent=2)
    return table(["NAME", "BALANCE", "RESERVED", "SPENT", "ID"],
                 [[a.name, format_micros(a.balance), format_micros(a.reserved),
                   format_micros(a.spent), a.id] for a in found])


def _key_json(key: KeyInfo) -> dict[str, Any]:
    return {"id": key.id, "account": key.account, "name": key.name, "admin": key.is_admin,
            "models": None if key.models is None else list(key.models), "rpm": key.rpm,
            "tpm": key.tpm, "max_concurrent": key.max_concurrent, "priority": key.priority,
            "expires_at": _when(key.expires_at), "revoked_at": _when(key.revoked_at),
            "created_at": _when(key.created_at)}


def _keys_out(found: list[KeyInfo], as_json: bool) -> str:
    if as_json:
        return json.dumps([_key_json(k) for k in found], indent=2)
    return table(["ID", "ACCOUNT", "MODELS", "RPM", "TPM", "EXPIRES", "REVOKED", "ADMIN"],
                 [[k.id, k.account, "all" if k.models is None else ",".join(k.models), k.rpm,
                   k.tpm, _when(k.expires_at), _when(k.revoked_at), "yes" if k.is_admin else ""]
                  for k in found])


async def _create_account(db: Database, args: argparse.Namespace) -> str:
    account = await ops.create_account(db, args.name, to_micros(args.balance, what="balance"),
                                       args.weight)
    return _accounts_out([account], args.json)


async def _set_weight(db: Database, args: argparse.Namespace) -> str:
    return _accounts_out([await ops.set_weight(db, args.name, args.weight)], args.json)


async def _top_up(db: Database, args: argparse.Namespace) -> str:
    account = await ops.top_up(db, args.name, to_micros(args.amount))
    return _accounts_out([account], args.json)


async def _list_accounts(db: Database, args: argparse.Namespace) -> str:
    return _accounts_out(await ops.list_accounts(db), args.json)


async def _create_key(db: Database, args: argparse.Namespace) -> str:
    models = None if args.models is None else args.models.split(",")
    expires = None if args.expires is None else ops.parse_when(args.expires, what="--expires")
    created = await ops.create_key(db, args.account, models=models, rpm=args.rpm, tpm=args.tpm,
                                   expires_at=expires, name=args.name, is_admin=args.admin,
                                   max_concurrent=args.max_concurrent, priority=args.priority)
    if args.json:
        return json.dumps({"key": created.text, "id": created.info.id})
    return (f"{_keys_out([created.info], False)}\n\n"
            f"key (shown only this once): {created.text}")


async def _list_keys(db: Database, args: argparse.Namespace) -> str:
    return _keys_out(await ops.list_keys(db, args.account), args.json)


async def _revoke_key(db: Database, args: argparse.Namespace) -> str:
    return _keys_out([await ops.revoke_key(db, args.id)], args.json)


async def _usage(db: Database, args: argparse.Namespace) -> str:
    since = None if args.since is None else ops.parse_when(args.since, what="--since")
    rows = await usage.totals(db, args.by, since=since, account=args.account)
    if args.json:
        return json.dumps([{"group": r.group, "requests": r.requests, **r.usage.as_json(),
                            "cost": format_micros(r.cost)} for r in rows], indent=2)
    return table([args.by.upper(), "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "REASONING",
                  "COST"],
                 [[r.group, r.requests, r.usage.prompt_tokens, r.usage.cached_tokens,
                   r.usage.completion_tokens, r.usage.reasoning_tokens, format_micros(r.cost)]
                  for r in rows])
