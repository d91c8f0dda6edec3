"""JSON on the wire: amounts stay `Decimal` in both directions, never float.

The gateways send and expect amounts as JSON numbers (vai247, bbmsl) or strings (vaultspay, pgv2).
`json.loads(parse_float=Decimal)` keeps a number exact on the way in; `dumps` writes a `Decimal`
back as the number it prints as, which the standard encoder cannot do without going through float.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


class NotJson(ValueError):
    """The body is not JSON the sandbox accepts (including NaN/Infinity, which JSON forbids)."""


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity by default; no gateway would, and a NaN amount would
    # poison every comparison after it.
    raise NotJson(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Parse a request body; numbers with a fraction or exponent become `Decimal`."""
    try:
        return json.loads(raw, parse_float=Decimal, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotJson(str(exc)) from exc


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, Decimal):
        out.append(str(value))
    elif isinstance(value, int | str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, dict):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.append(",")
            out.append(json.dumps(str(key), ensure_ascii=False))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: Any) -> bytes:
    """Compact JSON; a `Decimal` is written as a JSON number exactly as it prints."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")


def json_number(value: Any) -> Decimal | None:
    """A JSON number as a finite Decimal; None for anything else (strings, booleans, null)."""
    # bool is an int in Python, but `true` is not an amount.
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        return None
    amount = Decimal(value)
    return amount if amount.is_finite() else None


def decimal_places(amount: Decimal) -> int:
    """Significant decimal places: 1.50 has one, 100 has none."""
    exponent = amount.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def integer_digits(amount: Decimal) -> int:
    """Digits before the decimal point (at least 1)."""
    return max(1, len(str(abs(amount).to_integral_value(rounding="ROUND_DOWN"))))
