"""vai247 provider: the outgoing request and the mapping of every answer (offline)."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import httpx
import pytest

from providers.base import Ambiguous, GatewayRequest, Kind, NotSent, Outcome, RateLimited
from providers.vai247 import Vai247Provider, Vai247Settings

SETTINGS = Vai247Settings(
    base_url="https://merchant.dv.vai247.pro", app_id="app-1", api_key="key-secret-1"
)
REFUND = GatewayRequest(
    job_id="j1",
    kind=Kind.REFUND,
    payment_ref="ord_abc123xyz",
    currency="USD",
    amount=Decimal("50.00"),
    reason="Customer request",
)
CANCEL = GatewayRequest(
    job_id="j2",
    kind=Kind.CANCEL,
    payment_ref="ord_abc123xyz",
    currency="",
    reason="Customer changed mind",
)


def provider(handler) -> Vai247Provider:
    return Vai247Provider(SETTINGS, httpx.Client(transport=httpx.MockTransport(handler)))


def test_refund_sends_the_documented_body_and_auth_headers():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "refund_id": "ref_xyz789",
                "order_id": "ord_abc123xyz",
                "amount": 50.00,
                "status": "processing",
                "created_at": "2025-10-04T11:00:00Z",
            },
        )

    result = provider(handler).submit(REFUND)
    request = seen[0]
    assert request.method == "POST"
    assert str(request.url) == "https://merchant.dv.vai247.pro/api/v1/payment-gateway/order/refund"
    assert request.headers["X-App-Id"] == "app-1"
    assert request.headers["X-Api-Key"] == "key-secret-1"
    assert abs(int(request.headers["X-Timestamp"]) - time.time()) < 5
    assert request.headers["Content-Type"] == "application/json"
    # The amount is a JSON number written exactly (never through float).
    assert request.content == (
        b'{"order_id":"ord_abc123xyz","amount":50.00,"reason":"Customer request"}'
    )
    assert result.outcome is Outcome.SUCCEEDED
    assert result.provider_reference == "ref_xyz789"
    assert result.raw_status == "processing"


def test_cancel_of_a_pending_order_succeeds():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/payment-gateway/order/cancel"
        assert json.loads(request.content) == {
            "order_id": "ord_abc123xyz",
            "reason": "Customer changed mind",
        }
        return httpx.Response(
            200,
            json={
                "order_id": "ord_abc123xyz",
                "status": "cancelled",
                "cancelled_at": "2025-10-04T11:15:00Z",
            },
        )

    result = provider(handler).submit(CANCEL)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.raw_status == "cancelled"


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (409, "ORDER_NOT_CANCELLABLE", Outcome.DECLINED),
        (422, "AMOUNT_EXCEEDS_ORIGINAL", Outcome.DECLINED),
        (404, "ORDER_NOT_FOUND", Outcome.DECLINED),
        (401, "UNAUTHORIZED", Outcome.FAILED),
    ],
)
def test_refusals_carry_the_gateways_code_and_message(status, code, outcome):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"code": code, "message": f"because {code}"})

    result = provider(handler).submit(REFUND)
    assert (result.outcome, result.code, result.message) == (outcome, code, f"because {code}")
    assert result.http_status == status


@pytest.mark.parametrize(
    ("handler_result", "error"),
    [
        (httpx.ConnectError("refused"), NotSent),
        (httpx.ConnectTimeout("slow"), NotSent),
        (httpx.ReadTimeout("lost"), Ambiguous),
        (httpx.RemoteProtocolError("peer closed"), Ambiguous),
        (httpx.Response(500, text="boom"), Ambiguous),
        (httpx.Response(502, text="bad gateway"), Ambiguous),
        (httpx.Response(503, text="busy"), NotSent),
        (httpx.Response(429, headers={"Retry-After": "7"}), RateLimited),
        (httpx.Response(200, text="<html>not json"), Ambiguous),
        (httpx.Response(200, json={"status": "processing"}), Ambiguous),  # missing refund_id
        (
            httpx.Response(
                200,
                json={
                    "refund_id": "r",
                    "order_id": "o",
                    "amount": 1,
                    "status": "weird",
                    "created_at": "x",
                },
            ),
            Ambiguous,
        ),
        (httpx.Response(400, text="not json"), Ambiguous),
    ],
)
def test_transport_failures_are_classified_not_sent_or_ambiguous(handler_result, error):
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(handler_result, Exception):
            raise handler_result
        return handler_result

    with pytest.raises(error) as caught:
        provider(handler).submit(REFUND)
    if isinstance(caught.value, RateLimited):
        assert caught.value.retry_after == 7


def test_credentials_never_print():
    assert "key-secret-1" not in repr(SETTINGS)
    assert "key-secret-1" not in str(SETTINGS)
