"""Property-based tests of money at the edge: whatever comes in, the answer is an exact Decimal
in the currency's minor unit or a clear `InvalidRequest` — never a float, never another error."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import InvalidRequest
from worker.money import currency_exponent, from_minor, parse_amount, to_minor

CURRENCIES = ["USD", "JPY", "KWD", "HKD", "INR", "AED", "EUR", "BHD", "CLP"]

anything = st.one_of(
    st.text(),
    st.from_regex(r"[0-9]{1,60}(\.[0-9]{1,60})?", fullmatch=True),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.binary(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(), st.text(), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(value=anything, currency=st.one_of(st.sampled_from(CURRENCIES), st.text(max_size=5)))
def test_any_input_is_an_exact_amount_or_a_clear_refusal(value, currency):
    try:
        amount = parse_amount(value, currency)
    except InvalidRequest as exc:
        assert exc.field in ("amount", "currency")
        assert exc.message
        return
    assert isinstance(amount, Decimal)
    assert not isinstance(value, float | bool)
    assert amount > 0 and amount.is_finite()
    _code, exponent = currency_exponent(currency)
    assert -amount.as_tuple().exponent == exponent


@settings(max_examples=300, deadline=None)
@given(minor=st.integers(min_value=1, max_value=10**15 - 1), currency=st.sampled_from(CURRENCIES))
def test_every_minor_amount_round_trips_through_its_text(minor, currency):
    amount = from_minor(minor, currency)
    assert to_minor(parse_amount(str(amount), currency), currency) == minor


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="0123456789.,-+eE _\u0661\u00b9", max_size=12))
def test_only_plain_ascii_decimals_are_amounts(text):
    try:
        amount = parse_amount(text, "USD")
    except InvalidRequest:
        return
    stripped = text.strip()
    assert stripped.replace(".", "", 1).isascii() and stripped.replace(".", "", 1).isdigit()
    assert amount == Decimal(stripped).quantize(Decimal("0.01"))
