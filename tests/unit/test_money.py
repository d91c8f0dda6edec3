"""Money at the edge: Decimal only, a real currency's minor units, clear refusals."""

from __future__ import annotations

from decimal import Decimal

import pytest

from worker.errors import InvalidRequest
from worker.money import currency_exponent, format_amount, from_minor, parse_amount, to_minor


@pytest.mark.parametrize(
    ("value", "currency", "expected"),
    [
        ("50", "USD", Decimal("50.00")),
        ("50.5", "USD", Decimal("50.50")),
        ("50.000", "USD", Decimal("50.00")),  # trailing zeros beyond the minor unit are harmless
        (Decimal("12.34"), "HKD", Decimal("12.34")),
        (7, "INR", Decimal("7.00")),
        ("1000", "JPY", Decimal("1000")),
        ("1.125", "KWD", Decimal("1.125")),
        (" 3.10 ", "usd", Decimal("3.10")),
    ],
)
def test_valid_amounts_become_decimals_in_the_currencys_minor_unit(value, currency, expected):
    amount = parse_amount(value, currency)
    assert amount == expected
    assert amount.as_tuple().exponent == expected.as_tuple().exponent


@pytest.mark.parametrize(
    ("value", "currency", "fragment"),
    [
        ("50.001", "USD", "3 decimal places; USD has 2"),
        ("10.5", "JPY", "JPY has 0"),
        ("-1", "USD", "greater than zero"),
        (Decimal("-1"), "USD", "greater than zero"),
        ("0", "USD", "greater than zero"),
        ("0.00", "USD", "greater than zero"),
        ("NaN", "USD", "not an amount"),
        (Decimal("NaN"), "USD", "not a finite amount"),
        (Decimal("Infinity"), "USD", "not a finite amount"),
        ("1e3", "USD", "not an amount"),
        ("", "USD", "not an amount"),
        ("1,000.00", "USD", "not an amount"),
        ("١٢", "USD", "not an amount"),  # Arabic-Indic digits: Decimal would take them
        (50.5, "USD", "float"),
        (True, "USD", "bool"),
        (None, "USD", "string or Decimal"),
        ("9" * 16, "USD", "too large"),
        ("1" * 40, "USD", "too large"),  # beyond Decimal's 28-digit context
        ("1" * 27 + ".5", "USD", "too large"),
        ("50", "XXX", "not a currency used for payments"),
        ("50", "XTS", "not a currency used for payments"),
        ("50", "XAU", "not a currency used for payments"),
        ("50", "usd1", "three letters"),
        ("50", "ABC", "not an ISO 4217 currency"),
        ("50", 840, "three letters"),
    ],
)
def test_bad_amounts_and_currencies_are_refused_with_a_reason(value, currency, fragment):
    with pytest.raises(InvalidRequest) as caught:
        parse_amount(value, currency)
    assert fragment in str(caught.value)


def test_minor_units_round_trip_exactly():
    for text, currency in [("50.25", "USD"), ("1000", "JPY"), ("1.125", "KWD")]:
        amount = parse_amount(text, currency)
        assert from_minor(to_minor(amount, currency), currency) == amount
    assert to_minor(Decimal("50.25"), "USD") == 5025
    assert format_amount(5025, "USD") == "50.25"
    assert format_amount(5, "JPY") == "5"


def test_currency_exponent_comes_from_iso_4217():
    assert currency_exponent("usd") == ("USD", 2)
    assert currency_exponent("JPY") == ("JPY", 0)
    assert currency_exponent("BHD") == ("BHD", 3)
    assert currency_exponent("XAF") == ("XAF", 0)  # a real X-currency: CFA franc
