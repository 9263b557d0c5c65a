"""Amounts of money as integer micro-units, parsed exactly from decimal text or numbers.

Every amount is an `int` of micro-units (one millionth of the currency unit); amounts enter
and leave as decimal text with at most six decimals. Amounts are bounded: at most
`MAX_AMOUNT_UNITS` currency units (an amount, a balance), and a price at most
`MAX_PRICE_UNITS` per million tokens, so that every sum a 64-bit integer column stores stays
far inside it. Text amounts are plain ASCII decimals (`12.5`): no exponent, no other
script's digits, no NaN.

Nothing here knows about accounts or requests: the configuration checks prices with it, the
platform (platform/money.py) computes costs with it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from modelyard.errors import ModelyardError

MICROS = 1_000_000
"""Micro-units in one currency unit; also tokens in the "per million tokens" of a price."""


MAX_AMOUNT_UNITS = 10**12
"""The largest amount or balance, in currency units."""
MAX_AMOUNT_MICROS = MAX_AMOUNT_UNITS * MICROS
"""The same in micro-units (10^18, about a ninth of a signed 64-bit integer)."""
MAX_CREDITED_MICROS = 9 * 10**18
"""The largest running total of an account's credits (its `spent` never exceeds it), just
under a signed 64-bit integer's 9.22 * 10^18."""
MAX_PRICE_UNITS = 10**6
"""The largest price, in currency units per million tokens (one unit per token)."""
MAX_PRICE_MICROS = MAX_PRICE_UNITS * MICROS
_MAX_TEXT = 40
"""Longer text is no amount within bounds (13 digits, a point, 6 decimals, padding)."""
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


class AmountError(ModelyardError, ValueError):
    """An amount that is not a non-negative decimal with at most six decimals, in bounds."""


def _decimal(amount: str | int | float | Decimal, what: str) -> Decimal:
    if isinstance(amount, bool) or not isinstance(amount, str | int | float | Decimal):
        raise AmountError(f"{what} must be a number, got {amount!r}")
    if isinstance(amount, str):
        text = amount.strip(" \t")
        if len(text) > _MAX_TEXT or not _DECIMAL_TEXT.fullmatch(text):
            shown = amount if len(amount) <= _MAX_TEXT else f"{amount[:_MAX_TEXT]}..."
            raise AmountError(f"{what} must be a plain decimal number such as 12.5, got "
                              f"{shown!r}")
        return Decimal(text)
    if isinstance(amount, float):
        # repr is the shortest text that reads back as this float (0.1 -> "0.1").
        return Decimal(repr(amount))
    if isinstance(amount, int):
        # Clamped first: a huge int is out of bounds whatever its digits (and Decimal of
        # one with thousands of digits would be slow).
        return Decimal(min(max(amount, -MAX_AMOUNT_MICROS), MAX_AMOUNT_MICROS))
    return amount


def to_micros(amount: str | int | float | Decimal, *, what: str = "amount",
              maximum: int = MAX_AMOUNT_MICROS) -> int:
    """Parse currency units (`"12.5"`, `3`, `0.000001`) into micro-units, exactly; at most
    `maximum` micro-units."""
    try:
        value = _decimal(amount, what)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        raise AmountError(f"{what} must be a number, got {amount!r}") from None
    if not value.is_finite():
        raise AmountError(f"{what} must be a finite number, got {amount!r}")
    if value < 0:
        raise AmountError(f"{what} must not be negative, got {amount!r}")
    if value > Decimal(maximum) / MICROS:
        raise AmountError(f"{what} must be at most {maximum // MICROS}")
    micros = value * MICROS
    if micros != micros.to_integral_value():
        raise AmountError(f"{what} has more than 6 decimals: {amount!r}")
    return int(micros)


def format_micros(micros: int) -> str:
    """Micro-units as currency units with six decimals: 1500000 -> "1.500000"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{fraction:06d}"
