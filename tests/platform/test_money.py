"""Money: exact micro-units, prices per million tokens, and reserve >= settle."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelyard.platform.money import (
    MAX_PRICE_UNITS,
    AmountError,
    Price,
    format_micros,
    to_micros,
)


@pytest.mark.parametrize(("text", "micros"), [
    ("0", 0), ("1", 1_000_000), ("12.5", 12_500_000), ("0.000001", 1), (3, 3_000_000),
    (0.1, 100_000), (1e-05, 10), (" 2.25 ", 2_250_000), (Decimal("7.000010"), 7_000_010),
    (".5", 500_000), ("1000000000000", 10**18), (10**12, 10**18), (1e12, 10**18),
])
def test_amounts_parse_exactly(text: str | int | float | Decimal, micros: int) -> None:
    assert to_micros(text) == micros


@pytest.mark.parametrize("text", [
    "1.0000001", "-1", "abc", "", "nan", "inf", True, "1e-6", "1E3", "1e309",
    "\u0661\u0660", "\u0663",
    "10\x00", "0x10", "1_000", "1 000", "\u200b1", "1000000000000.000001", "9" * 5000,
    10**12 + 1, -(10**400), 10**400, float("inf"), float("-inf"), float("nan"), 1e300,
    Decimal("1e999999"), Decimal("NaN"), Decimal("-0.5"), None, [1],
], ids=lambda value: repr(value)[:24])
def test_bad_amounts_are_refused(text: object) -> None:
    """No exponent, no other script's digits (Decimal reads Arabic-Indic "10" as 10),
    nothing past 10^12 units: every amount fits a 64-bit column with room for the sums."""
    with pytest.raises(AmountError):
        to_micros(text)  # type: ignore[arg-type]


def test_prices_are_bounded() -> None:
    assert Price.from_units(MAX_PRICE_UNITS, 0).input == MAX_PRICE_UNITS * 1_000_000
    for prices in [(MAX_PRICE_UNITS + 1, 0), (0, "1e7"), (0, 0, float("inf"))]:
        with pytest.raises(AmountError):
            Price.from_units(*prices)
    # The largest price on a million-token prompt stays far inside a 64-bit integer.
    assert Price.from_units(MAX_PRICE_UNITS, MAX_PRICE_UNITS).max_cost(10**6, 10**6) < 2**62


@pytest.mark.parametrize(("micros", "text"), [
    (0, "0.000000"), (1, "0.000001"), (12_500_000, "12.500000"), (-1_500_000, "-1.500000"),
])
def test_amounts_format_with_six_decimals(micros: int, text: str) -> None:
    assert format_micros(micros) == text
    assert to_micros(text.lstrip("-")) == abs(micros)


def test_prices_are_per_million_tokens() -> None:
    price = Price.from_units(0.5, 1.5, cached_input_price=0.25)
    assert (price.input, price.cached_input, price.output) == (500_000, 250_000, 1_500_000)
    # 1000 uncached + 1000 cached prompt tokens and 2000 completion tokens:
    # 0.0005 + 0.00025 + 0.003 = 0.00375 units.
    assert price.cost(2000, 1000, 2000) == 3750
    assert price.max_cost(2000, 2000) == 4000
    assert Price.from_units(1, 2).cached_input == 1_000_000


def test_costs_round_up_once_per_request() -> None:
    price = Price.from_units("0.1", "0.3")  # 0.1 and 0.3 micro-units per token
    assert price.cost(1, 0, 0) == 1
    assert price.cost(10, 0, 0) == 1
    assert price.cost(11, 0, 0) == 2
    assert price.cost(10, 0, 10) == 4
    assert Price().cost(1000, 0, 1000) == 0
    assert Price().is_free


def test_cached_tokens_never_exceed_the_prompt() -> None:
    price = Price.from_units(1, 0, cached_input_price=0)
    assert price.cost(10, 50, 0) == 0
    assert price.cost(10, -5, 0) == 10


@given(prompt=st.integers(0, 200_000), cached=st.integers(0, 200_000),
       max_tokens=st.integers(0, 100_000), completion=st.integers(0, 100_000),
       prices=st.tuples(*[st.integers(0, 100_000_000)] * 3))
def test_the_real_cost_never_exceeds_the_reservation(
        prompt: int, cached: int, max_tokens: int, completion: int,
        prices: tuple[int, int, int]) -> None:
    price = Price(*prices)
    completion = min(completion, max_tokens)
    assert 0 <= price.cost(prompt, cached, completion) <= price.max_cost(prompt, max_tokens)
