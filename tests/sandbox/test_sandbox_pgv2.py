"""pgv2 simulator: V2_SHA256 both ways, nonces, refund rules, duplicates, settlement."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import httpx
import pytest

from sandbox.serve import RunningSandbox
from tests.sandbox.gateway_kit import (
    PGV2_QUERY,
    PGV2_REFUND,
    Admin,
    pgv2_authorization,
    pgv2_post,
    pgv2_response_signature_ok,
    wait_until,
)


def refund_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "merchantRefundNo": "REFUND-001",
        "paymentNo": "20240423220624300800001097000004",
        "amount": "50.00",
        "description": "User requested refund",
    }
    body.update(overrides)
    return body


@pytest.fixture
def payment(admin: Admin) -> dict[str, Any]:
    return admin.payment("pgv2", "20240423220624300800001097000004", "100.00", currency="INR")


def answer(response: httpx.Response) -> dict[str, Any]:
    """Every pgv2 answer is HTTP 200, JSON, correctly signed."""
    assert response.status_code == 200, response.text
    assert pgv2_response_signature_ok(response), response.headers.get("authorization")
    return dict(response.json())


def query(client: httpx.Client, **fields: str) -> dict[str, Any]:
    return answer(pgv2_post(client, PGV2_QUERY, fields))


def test_refund_create_returns_documented_signed_body(
    client: httpx.Client, admin: Admin, payment: dict[str, Any]
) -> None:
    body = answer(pgv2_post(client, PGV2_REFUND, refund_body()))

    assert body["code"] == "OK"
    assert body["errorMessage"] is None
    data = body["data"]
    assert data["paymentNo"] == payment["payment_ref"]
    assert data["merchantRefundNo"] == "REFUND-001"
    assert (data["amount"], data["currency"]) == ("50.00", "INR")
    assert data["refundNo"].isdigit() and len(data["refundNo"]) == 32
    [entry] = admin.ledger(gateway="pgv2")
    assert entry["reference"] == data["refundNo"]
    assert entry["merchant_reference"] == "REFUND-001"
    assert (entry["payment_ref"], entry["amount"], entry["status"]) == (
        payment["payment_ref"],
        "50.00",
        "PROCESSING",
    )


def test_response_signature_covers_the_exact_body(
    client: httpx.Client, payment: dict[str, Any]
) -> None:
    response = pgv2_post(client, PGV2_REFUND, refund_body())
    assert pgv2_response_signature_ok(response)
    header = response.headers["authorization"]
    assert "appId=sandbox-pgv2-app" in header
    timestamp = dict(item.split("=", 1) for item in header.split(" ", 1)[1].split(","))["timestamp"]
    assert abs(int(timestamp) - time.time() * 1000) < 60_000  # milliseconds

    tampered = httpx.Response(
        200,
        headers=response.headers,
        content=response.content.replace(b"50.00", b"60.00"),
        request=response.request,
    )
    assert not pgv2_response_signature_ok(tampered)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "wrong-scheme",
        "unparseable",
        "wrong-app-id",
        "wrong-secret",
        "body-changed",
        "old-timestamp",
        "seconds-not-ms",
        "short-nonce",
        "uppercase-sign",
    ],
)
def test_request_signature_failures_are_sign_error_and_not_applied(
    client: httpx.Client, admin: Admin, payment: dict[str, Any], case: str
) -> None:
    body = json.dumps(refund_body()).encode()
    url = f"{client.base_url}".rstrip("/") + PGV2_REFUND
    authorization: str | None = pgv2_authorization(url, body)
    sent = body
    if case == "missing":
        authorization = None
    elif case == "wrong-scheme":
        authorization = "HMAC_SHA256 " + pgv2_authorization(url, body).split(" ", 1)[1]
    elif case == "unparseable":
        authorization = "V2_SHA256 garbage"
    elif case == "wrong-app-id":
        authorization = pgv2_authorization(url, body, app_id="someone-else")
    elif case == "wrong-secret":
        authorization = pgv2_authorization(url, body, app_secret="not-the-secret")
    elif case == "body-changed":
        sent = body.replace(b"50.00", b"60.00")
    elif case == "old-timestamp":
        stale = str(time.time_ns() // 1_000_000 - 6 * 60 * 1000)
        authorization = pgv2_authorization(url, body, timestamp=stale)
    elif case == "seconds-not-ms":
        authorization = pgv2_authorization(url, body, timestamp=str(int(time.time())))
    elif case == "short-nonce":
        authorization = pgv2_authorization(url, body, nonce="abc123")
    elif case == "uppercase-sign":
        assert authorization is not None
        head, _, rest = authorization.partition("sign=")
        sign, _, tail = rest.partition(",")
        authorization = f"{head}sign={sign.upper()},{tail}"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization

    body_out = answer(client.post(PGV2_REFUND, content=sent, headers=headers))

    assert body_out["code"] == "SIGN_ERROR"
    assert body_out["data"] is None
    assert body_out["errorMessage"]
    assert admin.ledger() == []


def test_a_reused_nonce_is_refused(
    client: httpx.Client, admin: Admin, payment: dict[str, Any]
) -> None:
    nonce = secrets.token_hex(16)

    first = answer(pgv2_post(client, PGV2_REFUND, refund_body(), nonce=nonce))
    second = answer(
        pgv2_post(client, PGV2_REFUND, refund_body(merchantRefundNo="REFUND-002"), nonce=nonce)
    )

    assert first["code"] == "OK"
    assert second["code"] == "NONCE_REUSED"
    assert len(admin.ledger()) == 1


def test_a_nonce_of_a_badly_signed_request_is_not_consumed(
    client: httpx.Client, payment: dict[str, Any]
) -> None:
    nonce = secrets.token_hex(16)
    bad = answer(pgv2_post(client, PGV2_REFUND, refund_body(), nonce=nonce, app_secret="wrong"))
    good = answer(pgv2_post(client, PGV2_REFUND, refund_body(), nonce=nonce))
    assert (bad["code"], good["code"]) == ("SIGN_ERROR", "OK")


@pytest.mark.parametrize(
    "overrides",
    [
        {"amount": "50"},
        {"amount": "50.0"},
        {"amount": "50.000"},
        {"amount": 50.00},
        {"amount": "1234567890123456.00"},
        {"amount": "0.00"},
        {"description": ""},
        {"description": "x" * 81},
        {"merchantRefundNo": "R" * 51},
        {"paymentNo": None},
    ],
)
def test_parameter_errors(
    client: httpx.Client, admin: Admin, payment: dict[str, Any], overrides: dict[str, Any]
) -> None:
    body = {key: value for key, value in refund_body(**overrides).items() if value is not None}
    assert answer(pgv2_post(client, PGV2_REFUND, body))["code"] == "PARAM_ERROR"
    assert admin.ledger() == []


def test_business_refusals(client: httpx.Client, admin: Admin, payment: dict[str, Any]) -> None:
    admin.payment("pgv2", "PAY-FAILED", "100.00", status="failed")

    def code(**overrides: str) -> str:
        return str(answer(pgv2_post(client, PGV2_REFUND, refund_body(**overrides)))["code"])

    assert code(paymentNo="PAY-NONE") == "PAYMENT_NOT_FOUND"
    assert code(paymentNo="PAY-FAILED") == "PAYMENT_NOT_REFUNDABLE"
    assert code(merchantRefundNo="R1", amount="70.00") == "OK"
    assert code(merchantRefundNo="R2", amount="30.01") == "REFUND_AMOUNT_EXCEEDED"
    assert code(merchantRefundNo="R3", amount="30.00") == "OK"
    assert [entry["merchant_reference"] for entry in admin.ledger()] == ["R1", "R3"]


def test_duplicate_merchant_refund_no_replays_the_first_answer(
    client: httpx.Client, admin: Admin, payment: dict[str, Any]
) -> None:
    first = answer(pgv2_post(client, PGV2_REFUND, refund_body()))
    again = answer(pgv2_post(client, PGV2_REFUND, refund_body()))

    assert again == first
    assert len(admin.ledger()) == 1


def test_duplicate_merchant_refund_no_is_refused_in_refuse_mode(
    client: httpx.Client, admin: Admin, payment: dict[str, Any]
) -> None:
    settings = client.post("/_admin/pgv2/settings", json={"duplicate_mode": "refuse"}).json()
    assert settings["duplicate_mode"] == "refuse"

    first = answer(pgv2_post(client, PGV2_REFUND, refund_body()))
    again = answer(pgv2_post(client, PGV2_REFUND, refund_body()))

    assert first["code"] == "OK"
    assert again["code"] == "DUPLICATE_MERCHANT_REFUND_NO"
    assert again["data"] is None
    assert len(admin.ledger()) == 1


def test_a_refused_request_does_not_reserve_its_merchant_refund_no(
    client: httpx.Client, admin: Admin, payment: dict[str, Any]
) -> None:
    client.post("/_admin/pgv2/settings", json={"duplicate_mode": "refuse"})
    refused = answer(pgv2_post(client, PGV2_REFUND, refund_body(amount="500.00")))
    accepted = answer(pgv2_post(client, PGV2_REFUND, refund_body()))
    assert (refused["code"], accepted["code"]) == ("REFUND_AMOUNT_EXCEEDED", "OK")


def test_inquiry_follows_the_refund_life_cycle(
    client: httpx.Client, admin: Admin, payment: dict[str, Any]
) -> None:
    created = answer(pgv2_post(client, PGV2_REFUND, refund_body()))["data"]

    processing = query(client, merchantRefundNo="REFUND-001")
    by_refund_no = query(client, refundNo=created["refundNo"])
    settled = client.post("/_admin/pgv2/refunds/REFUND-001/status", json={"status": "SUCCESS"})
    success = query(client, merchantRefundNo="REFUND-001")

    assert processing["code"] == "OK"
    assert processing["data"] == {**created, "status": "PROCESSING"}
    assert by_refund_no["data"]["merchantRefundNo"] == "REFUND-001"
    assert settled.json()["status"] == "SUCCESS"
    assert success["data"]["status"] == "SUCCESS"
    assert admin.ledger()[0]["status"] == "SUCCESS"


def test_failed_refund_is_not_effective_and_frees_the_amount(
    client: httpx.Client, admin: Admin, payment: dict[str, Any]
) -> None:
    answer(pgv2_post(client, PGV2_REFUND, refund_body(amount="100.00")))
    client.post("/_admin/pgv2/refunds/REFUND-001/status", json={"status": "FAILED"})

    failed = query(client, merchantRefundNo="REFUND-001")
    retry = answer(
        pgv2_post(client, PGV2_REFUND, refund_body(merchantRefundNo="R-2", amount="100.00"))
    )

    assert failed["data"]["status"] == "FAILED"
    assert retry["code"] == "OK"
    entries = admin.ledger()
    assert [(entry["status"], entry["effective"]) for entry in entries] == [
        ("FAILED", False),
        ("PROCESSING", True),
    ]


def test_refund_settles_after_the_configured_delay(
    client: httpx.Client, payment: dict[str, Any]
) -> None:
    client.post("/_admin/pgv2/settings", json={"settle_after_seconds": 0.2})
    answer(pgv2_post(client, PGV2_REFUND, refund_body()))

    wait_until(
        lambda: query(client, merchantRefundNo="REFUND-001")["data"]["status"] == "SUCCESS",
        timeout=5.0,
    )


def test_inquiry_of_unknown_refund_and_missing_keys(client: httpx.Client) -> None:
    assert query(client, merchantRefundNo="NEVER")["code"] == "REFUND_NOT_FOUND"
    assert query(client, refundNo="123")["code"] == "REFUND_NOT_FOUND"
    assert answer(pgv2_post(client, PGV2_QUERY, {}))["code"] == "PARAM_ERROR"


def test_inquiry_checks_the_signature(client: httpx.Client) -> None:
    response = client.post(PGV2_QUERY, json={"merchantRefundNo": "X"})
    assert answer(response)["code"] == "SIGN_ERROR"


def test_admin_pgv2_refund_views(client: httpx.Client, payment: dict[str, Any]) -> None:
    assert client.get("/_admin/pgv2/refunds/NONE").status_code == 404
    assert (
        client.post("/_admin/pgv2/refunds/NONE/status", json={"status": "SUCCESS"}).status_code
        == 404
    )
    answer(pgv2_post(client, PGV2_REFUND, refund_body()))
    view = client.get("/_admin/pgv2/refunds/REFUND-001").json()
    assert view["status"] == "PROCESSING"
    bad = client.post("/_admin/pgv2/refunds/REFUND-001/status", json={"status": "PROCESSING"})
    assert bad.status_code == 422


def test_concurrent_duplicates_apply_once(
    simulator: RunningSandbox, admin: Admin, payment: dict[str, Any]
) -> None:
    # Given 20 simultaneous sends of one merchantRefundNo (a retry storm),
    async def fire() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=simulator.base_url) as http:
            body = json.dumps(refund_body()).encode()
            url = simulator.base_url + PGV2_REFUND
            responses = await asyncio.gather(
                *(
                    http.post(
                        PGV2_REFUND,
                        content=body,
                        headers={
                            "Content-Type": "application/json",
                            "Accept": "application/json",
                            "Authorization": pgv2_authorization(url, body),
                        },
                    )
                    for _ in range(20)
                )
            )
        return [response.json() for response in responses]

    # then every answer is the same refund and the ledger holds it once.
    answers = asyncio.run(fire())
    assert {item["code"] for item in answers} == {"OK"}
    assert len({item["data"]["refundNo"] for item in answers}) == 1
    assert len(admin.ledger()) == 1
