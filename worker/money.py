"""Money at the edge: Decimal only, in a real currency's minor units (DESIGN.md rule 7).

Currency facts (which codes exist, how many decimals) come from ISO 4217 through py-moneyed
(itself built on Babel's CLDR data), not from a table of ours.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import moneyed

from worker.errors import InvalidRequest

# Amounts are stored as integers in minor units (BIGINT); 15 integer digits is beyond any refund
# and keeps the product with 10**3 (three-decimal currencies) far inside 2**63.
MAX_INTEGER_DIGITS = 15
_AMOUNT_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?")  # ASCII only: Decimal takes any script
_CURRENCY_TEXT = re.compile(r"[A-Za-z]{3}")


def currency_exponent(code: Any, *, field: str = "currency") -> tuple[str, int]:
    """The ISO 4217 code (upper case) and its number of decimals.

    Refuses codes that are not a currency anyone pays in: XXX ("no currency"), XTS (testing),
    precious metals and special drawing rights — ISO lists them, but no country uses them.
    """
    if not isinstance(code, str) or not _CURRENCY_TEXT.fullmatch(code):
        raise InvalidRequest(
            field, f"{code!r} is not a currency code: use three letters (ISO 4217)"
        )
    code = code.upper()
    problem = _exponent_of(code)
    if isinstance(problem, str):
        raise InvalidRequest(field, problem)
    return code, problem


@functools.lru_cache(maxsize=512)
def _exponent_of(code: str) -> int | str:
    """The decimals of an upper-case code, or why it is refused. Cached: every enqueue asks
    several times, and the answer is fixed data (ISO 4217 is at most a few hundred codes)."""
    try:
        currency = moneyed.get_currency(code)
    except moneyed.CurrencyDoesNotExist:
        return f"{code} is not an ISO 4217 currency"
    if not _is_national(currency):
        return f"{code} is not a currency used for payments"
    sub_unit = currency.sub_unit
    exponent = len(str(sub_unit)) - 1
    if sub_unit != 10**exponent:
        return f"{code} has no decimal minor unit"
    return exponent


def _is_national(currency: moneyed.Currency) -> bool:
    countries = [c for c in (currency.countries or []) if c]
    return any(not c.startswith(("ZZ", "UNKNOWN")) for c in countries)


def parse_amount(value: Any, currency: str, *, field: str = "amount") -> Decimal:
    """A positive amount with at most the currency's decimals, as a Decimal.

    Accepts a Decimal, an int, or a string of digits with an optional decimal part ("50",
    "50.5", "50.50"). Refuses floats (binary fractions are not money), booleans, NaN,
    infinities, exponents ("1e3"), signs, zero, and more decimals than the currency has.
    """
    _code, exponent = currency_exponent(currency)
    if isinstance(value, bool | float):
        raise InvalidRequest(
            field,
            f"{value!r} is a {type(value).__name__}; give amounts as a string or Decimal "
            "(a float cannot hold money exactly)",
        )
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise InvalidRequest(field, f"{value!r} must be greater than zero")
        if not _AMOUNT_TEXT.fullmatch(text):
            raise InvalidRequest(
                field,
                f"{value!r} is not an amount: use digits with an optional decimal point, "
                'like "50" or "50.25" (no signs, exponents or separators)',
            )
        try:
            amount = Decimal(text)
        except InvalidOperation:  # pragma: no cover - the pattern already guarantees digits
            raise InvalidRequest(field, f"{value!r} is not an amount") from None
    else:
        raise InvalidRequest(
            field, f"amount must be a string or Decimal, not {type(value).__name__}"
        )
    if not amount.is_finite():
        raise InvalidRequest(field, f"{value!r} is not a finite amount")
    if amount <= 0:
        raise InvalidRequest(field, f"{value!r} must be greater than zero")
    # Before any arithmetic: Decimal's 28-digit context cannot quantize a longer number.
    if amount.adjusted() + 1 > MAX_INTEGER_DIGITS:
        raise InvalidRequest(field, f"{value} is too large (at most {MAX_INTEGER_DIGITS} digits)")
    # Trailing zeros beyond the currency's decimals are harmless ("50.000" USD is 50.00).
    places_needed = max(0, -int(amount.normalize().as_tuple().exponent))
    if places_needed > exponent:
        raise InvalidRequest(
            field, f"{value} has {places_needed} decimal places; {currency.upper()} has {exponent}"
        )
    return amount.quantize(Decimal(1).scaleb(-exponent))


def to_minor(amount: Decimal, currency: str) -> int:
    """50.25 USD -> 5025."""
    _code, exponent = currency_exponent(currency)
    return int(amount.scaleb(exponent))


def from_minor(minor: int, currency: str) -> Decimal:
    """5025 USD -> Decimal('50.25')."""
    _code, exponent = currency_exponent(currency)
    return Decimal(minor).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))


def format_amount(minor: int | None, currency: str | None) -> str | None:
    """The amount as the string refundq shows everywhere ("50.25")."""
    if minor is None or currency is None:
        return None
    return str(from_minor(minor, currency))
