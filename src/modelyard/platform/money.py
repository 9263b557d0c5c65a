"""Money as integer micro-units, and what a request costs.

Every amount the platform stores or compares is an `int` of micro-units (one millionth of
the currency unit); amounts enter and leave as decimal text with at most six decimals.
Prices are per million tokens, so a price of `p` currency units per million tokens is
`p * 1e6` micro-units per million tokens, i.e. `p` micro-units per token: a request's cost
is `ceil(sum(tokens * price_micros_per_million) / 1e6)` micro-units, rounded up once per
request, never per token.

Amounts are bounded: at most `MAX_AMOUNT_UNITS` currency units (an amount, a balance), and a
price at most `MAX_PRICE_UNITS` per million tokens, so that every sum the ledger stores
stays far inside a 64-bit integer column (PostgreSQL's BIGINT, SQLite's INTEGER) instead of
overflowing it (an error there) or turning into a float (silently, on SQLite). Text amounts
are plain ASCII decimals (`12.5`): no exponent, no other script's digits, no NaN. The parsing
and the bounds live in `modelyard.units` (the configuration checks prices with it too).
"""

from __future__ import annotations

from dataclasses import dataclass

from modelyard.units import (
    MAX_AMOUNT_MICROS,
    MAX_AMOUNT_UNITS,
    MAX_CREDITED_MICROS,
    MAX_PRICE_MICROS,
    MAX_PRICE_UNITS,
    MICROS,
    AmountError,
    format_micros,
    to_micros,
)

__all__ = [
    "FREE",
    "MAX_AMOUNT_MICROS",
    "MAX_AMOUNT_UNITS",
    "MAX_CREDITED_MICROS",
    "MAX_PRICE_MICROS",
    "MAX_PRICE_UNITS",
    "MICROS",
    "AmountError",
    "Price",
    "format_micros",
    "to_micros",
]


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True)
class Price:
    """A model's prices, in micro-units per million tokens."""

    input: int = 0
    cached_input: int = 0
    output: int = 0

    @classmethod
    def from_units(cls, input_price: float | str, output_price: float | str,
                   cached_input_price: float | str | None = None) -> Price:
        """Prices per million tokens in currency units; cached input defaults to input."""
        cached = input_price if cached_input_price is None else cached_input_price
        return cls(to_micros(input_price, what="input_price", maximum=MAX_PRICE_MICROS),
                   to_micros(cached, what="cached_input_price", maximum=MAX_PRICE_MICROS),
                   to_micros(output_price, what="output_price", maximum=MAX_PRICE_MICROS))

    @property
    def is_free(self) -> bool:
        return self.input == 0 and self.cached_input == 0 and self.output == 0

    def max_cost(self, prompt_tokens: int, max_tokens: int) -> int:
        """What a request may cost at most: every prompt token uncached, max_tokens generated.

        When cached input is priced above input, the reservation assumes every prompt token
        at the higher of the two, so the real cost never exceeds it.
        """
        per_prompt_token = max(self.input, self.cached_input)
        return _ceil_div(prompt_tokens * per_prompt_token + max_tokens * self.output, MICROS)

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """The real cost. `prompt_tokens` includes the `cached_tokens` (OpenAI's usage)."""
        cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
        uncached = max(prompt_tokens, 0) - cached
        total = uncached * self.input + cached * self.cached_input + max(
            completion_tokens, 0) * self.output
        return _ceil_div(total, MICROS)

    def as_units(self) -> dict[str, float]:
        """Per million tokens in currency units, for /v1/models."""
        return {"input": self.input / MICROS, "cached_input": self.cached_input / MICROS,
                "output": self.output / MICROS}


FREE = Price()
