"""vai247 simulator: header auth, refund/cancel rules, ledger (docs/inferred-contracts.md)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest

from sandbox.serve import RunningSandbox
from tests.sandbox.gateway_kit import (
    VAI247_CANCEL,
    VAI247_REFUND,
    Admin,
    vai247_headers,
    vai247_post,
)


def decimal_json(response: httpx.Response) -> dict[str, Any]:
    return dict(json.loads(response.content, parse_float=Decimal))


def test_refund_returns_documented_body_and_writes_one_ledger_entry(
    client: httpx.Client, admin: Admin
) -> None:
    admin.payment("vai247", "ord_1", "100.00", currency="HKD")

    response = vai247_post(
        client, VAI247_REFUND, '{"order_id":"ord_1","amount":50.00,"reason":"Customer request"}'
    )

    assert response.status_code == 200
    body = decimal_json(response)
    assert re.fullmatch(r"ref_[0-9a-f]{24}", body["refund_id"])
    assert body["order_id"] == "ord_1"
    assert body["amount"] == Decimal("50.00")
    assert isinstance(body["amount"], Decimal)  # a JSON number, not a string
    assert body["status"] == "processing"
    assert body["created_at"].endswith("Z")
    [entry] = admin.ledger(gateway="vai247")
    assert entry["kind"] == "refund"
    assert entry["payment_ref"] == "ord_1"
    assert entry["amount"] == "50.00"
    assert entry["currency"] == "HKD"
    assert entry["reference"] == body["refund_id"]
    assert entry["merchant_reference"] is None
    assert entry["effective"] is True
    payment = admin.get_payment("vai247", "ord_1")
    assert payment["status"] == "completed"  # refunding does not change the order status
    assert payment["refunded_amount"] == "50.00"


@pytest.mark.parametrize(
    "overrides",
    [
        {"app_id": "someone-else"},
        {"api_key": "wrong-key"},
        {"timestamp_offset": -301},
        {"timestamp_offset": 301},
    ],
    ids=["wrong-app-id", "wrong-api-key", "timestamp-too-old", "timestamp-in-future"],
)
def test_bad_credentials_or_skewed_timestamp_get_401_and_nothing_is_applied(
    client: httpx.Client, admin: Admin, overrides: dict[str, Any]
) -> None:
    admin.payment("vai247", "ord_1", "100.00")
    if "timestamp_offset" in overrides:
        overrides = {"timestamp": int(time.time()) + overrides["timestamp_offset"]}

    response = vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":1}', **overrides)

    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"
    assert admin.ledger() == []


def test_missing_auth_headers_get_401(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vai247", "ord_1", "100.00")
    response = client.post(VAI247_REFUND, json={"order_id": "ord_1", "amount": 1})
    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"amount":10}',
        '{"order_id":"ord_1"}',
        '{"order_id":"ord_1","amount":"10.00"}',
        '{"order_id":"ord_1","amount":0}',
        '{"order_id":"ord_1","amount":-5}',
        '{"order_id":"ord_1","amount":10.001}',
        '{"order_id":"ord_1","amount":NaN}',
        '{"order_id":"ord_1","amount":true}',
        '{"order_id":123,"amount":10}',
    ],
)
def test_ill_formed_refunds_get_400_invalid_request(
    client: httpx.Client, admin: Admin, body: str
) -> None:
    admin.payment("vai247", "ord_1", "100.00")

    response = vai247_post(client, VAI247_REFUND, body)

    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_REQUEST"
    assert admin.ledger() == []


def test_unknown_order_gets_404(client: httpx.Client) -> None:
    response = vai247_post(client, VAI247_REFUND, '{"order_id":"nope","amount":1}')
    assert response.status_code == 404
    assert response.json()["code"] == "ORDER_NOT_FOUND"


def test_refunds_are_limited_cumulatively_by_the_order_amount(
    client: httpx.Client, admin: Admin
) -> None:
    admin.payment("vai247", "ord_1", "100.00")

    first = vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":60}')
    too_much = vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":40.01}')
    rest = vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":40.00}')

    assert first.status_code == 200
    assert too_much.status_code == 422
    assert too_much.json()["code"] == "AMOUNT_EXCEEDS_ORIGINAL"
    assert rest.status_code == 200
    assert [entry["amount"] for entry in admin.ledger()] == ["60", "40.00"]
    assert admin.get_payment("vai247", "ord_1")["refundable_amount"] == "0.00"


def test_a_repeated_refund_is_a_new_refund(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vai247", "ord_1", "100.00")
    body = '{"order_id":"ord_1","amount":10}'

    first = vai247_post(client, VAI247_REFUND, body).json()
    second = vai247_post(client, VAI247_REFUND, body).json()

    assert first["refund_id"] != second["refund_id"]
    assert len(admin.ledger(payment_ref="ord_1")) == 2


@pytest.mark.parametrize("status", ["pending", "processing", "cancelled"])
def test_only_completed_orders_can_be_refunded(
    client: httpx.Client, admin: Admin, status: str
) -> None:
    admin.payment("vai247", "ord_1", "100.00", status=status)

    response = vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":1}')

    assert response.status_code == 409
    assert response.json()["code"] == "ORDER_NOT_REFUNDABLE"
    assert admin.ledger() == []


@pytest.mark.parametrize("status", ["pending", "processing"])
def test_cancel_of_pending_or_processing_order_is_applied_once(
    client: httpx.Client, admin: Admin, status: str
) -> None:
    admin.payment("vai247", "ord_1", "80.00", status=status)

    response = vai247_post(client, VAI247_CANCEL, '{"order_id":"ord_1","reason":"changed mind"}')
    again = vai247_post(client, VAI247_CANCEL, '{"order_id":"ord_1"}')

    assert response.status_code == 200
    body = response.json()
    assert body["order_id"] == "ord_1"
    assert body["status"] == "cancelled"
    assert body["cancelled_at"].endswith("Z")
    assert again.status_code == 409
    assert again.json()["code"] == "ORDER_NOT_CANCELLABLE"
    assert again.json()["message"].endswith("already cancelled")
    [entry] = admin.ledger()
    assert (entry["kind"], entry["amount"], entry["reference"]) == ("cancel", "80.00", None)
    assert admin.get_payment("vai247", "ord_1")["status"] == "cancelled"


def test_completed_order_cannot_be_cancelled(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vai247", "ord_1", "80.00")

    response = vai247_post(client, VAI247_CANCEL, '{"order_id":"ord_1"}')

    assert response.status_code == 409
    assert response.json() == {
        "code": "ORDER_NOT_CANCELLABLE",
        "message": "Only pending or processing orders can be cancelled; "
        "completed orders must be refunded",
    }
    assert admin.ledger() == []


def test_cancel_checks_auth_and_order(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vai247", "ord_1", "80.00", status="pending")
    assert vai247_post(client, VAI247_CANCEL, '{"order_id":"x"}').status_code == 404
    assert vai247_post(client, VAI247_CANCEL, "{}").status_code == 400
    unauthorized = vai247_post(client, VAI247_CANCEL, '{"order_id":"ord_1"}', api_key="bad")
    assert unauthorized.status_code == 401
    assert admin.ledger() == []


def test_concurrent_refunds_never_exceed_the_order_amount(
    simulator: RunningSandbox, admin: Admin
) -> None:
    # Given an order of 100.00 and 25 simultaneous refunds of 10.00 each,
    admin.payment("vai247", "ord_race", "100.00")

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=simulator.base_url) as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        VAI247_REFUND,
                        content=b'{"order_id":"ord_race","amount":10.00}',
                        headers=vai247_headers(),
                    )
                    for _ in range(25)
                )
            )
        return [response.status_code for response in responses]

    # when they race, then exactly ten are applied and the ledger adds up to the order amount.
    statuses = asyncio.run(fire())
    assert statuses.count(200) == 10
    assert statuses.count(422) == 15
    entries = admin.ledger(payment_ref="ord_race")
    assert sum(Decimal(entry["amount"]) for entry in entries) == Decimal("100.00")
