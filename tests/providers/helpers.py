"""Test doubles for the provider unit tests: fixtures from the seeds, a recording mock transport,
job requests, and an independent pgv2 signer (written from the vendor's page, not imported from
the provider, so the two implementations check each other)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from providers.base import GatewayRequest, Kind, json_bytes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

JOB_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # job ids are 32 hex characters


def fixture_text(gateway: str, name: str) -> str:
    return (FIXTURES / gateway / name).read_text(encoding="utf-8")


def fixture_json(gateway: str, name: str) -> Any:
    """A fixture parsed as a gateway's answer is parsed: numbers with a fraction as Decimal."""
    return json.loads(fixture_text(gateway, name), parse_float=Decimal)


def comparable(value: Any) -> Any:
    """Numbers (and numeric strings the models turn into Decimal) compared by their text, so
    15.00 stays 15.00 and "50.50" stays "50.50": a round trip that loses digits fails."""
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | Decimal):
        return str(value)
    return value


def assert_round_trip(model: Any, payload: dict[str, Any]) -> Any:
    """`payload` parses into `model` and dumps back to the same fields and values."""
    parsed = model.model_validate(payload)
    dumped = parsed.model_dump(by_alias=True, exclude_unset=True)
    assert comparable(dumped) == comparable(payload)
    return parsed


def refund_request(**overrides: Any) -> GatewayRequest:
    values: dict[str, Any] = {
        "job_id": JOB_ID,
        "kind": Kind.REFUND,
        "payment_ref": "ORDER-1001",
        "currency": "HKD",
        "amount": Decimal("10.00"),
    }
    values.update(overrides)
    return GatewayRequest(**values)


Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that keeps every request it was sent."""

    def __init__(self, respond: Handler) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        # A snapshot: an auth flow may change the headers of the same object before a resend.
        snapshot = httpx.Request(
            request.method, request.url, headers=request.headers.copy(), content=request.read()
        )
        self.requests.append(snapshot)
        return self.respond(request)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self))

    def to(self, path: str) -> list[httpx.Request]:
        return [request for request in self.requests if request.url.path == path]


def json_response(
    status: int, payload: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    """A JSON response; Decimals are written as JSON numbers exactly as they print."""
    return httpx.Response(
        status,
        content=json_bytes(payload),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def hand_pgv2_sign(
    app_id: str, app_secret: str, method: str, url: str, timestamp: str, nonce: str, body: bytes
) -> str:
    """The seed's seven lines, each ending in a newline; lowercase hex SHA-256."""
    text = f"{app_id}\n{app_secret}\n{method}\n{url}\n{timestamp}\n{nonce}\n"
    return hashlib.sha256(text.encode("utf-8") + body + b"\n").hexdigest()
