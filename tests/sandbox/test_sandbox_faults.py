"""Fault injection, through real HTTP: what the client sees and what the ledger says."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.sandbox.gateway_kit import (
    BBMSL_REFUND,
    PGV2_QUERY,
    PGV2_REFUND,
    VAI247_CANCEL,
    VAI247_REFUND,
    VAULTSPAY_AUTH,
    VAULTSPAY_CREATE,
    VAULTSPAY_STATUS,
    Admin,
    bbmsl_envelope,
    bearer,
    pgv2_post,
    pgv2_response_signature_ok,
    vai247_headers,
    vai247_post,
    vaultspay_token,
    wait_until,
)

REFUND_10 = '{"order_id":"ord_1","amount":10}'


@pytest.fixture
def order(admin: Admin) -> dict[str, Any]:
    return admin.payment("vai247", "ord_1", "100.00")


def test_latency_delays_the_answer_and_applies(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    admin.fault(gateway="vai247", endpoint="refund", kind="latency", latency_ms=300, times=1)

    started = time.monotonic()
    response = vai247_post(client, VAI247_REFUND, REFUND_10)
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert elapsed >= 0.3
    assert len(admin.ledger()) == 1
    [call] = admin.calls()
    assert (call["fault"], call["http_status"]) == ("latency", 200)


@pytest.mark.parametrize(("status", "expected"), [(None, 503), (500, 500), (502, 502)])
def test_error_answers_the_status_and_does_not_apply(
    client: httpx.Client, admin: Admin, order: dict[str, Any], status: int | None, expected: int
) -> None:
    rule: dict[str, Any] = {"gateway": "vai247", "endpoint": "refund", "kind": "error"}
    if status is not None:
        rule["status"] = status
    admin.fault(**rule)

    response = vai247_post(client, VAI247_REFUND, REFUND_10)

    assert response.status_code == expected
    assert isinstance(response.json(), dict)
    assert admin.ledger() == []
    assert admin.calls()[0]["fault"] == "error"


@pytest.mark.parametrize(("retry_after", "header"), [(None, "1"), (2, "2"), (0.5, "0.5")])
def test_rate_limit_is_429_with_retry_after_and_does_not_apply(
    client: httpx.Client,
    admin: Admin,
    order: dict[str, Any],
    retry_after: float | None,
    header: str,
) -> None:
    rule: dict[str, Any] = {"gateway": "vai247", "endpoint": "refund", "kind": "rate_limit"}
    if retry_after is not None:
        rule["retry_after"] = retry_after
    admin.fault(**rule)

    response = vai247_post(client, VAI247_REFUND, REFUND_10)

    assert response.status_code == 429
    assert response.headers["retry-after"] == header
    assert admin.ledger() == []


def test_drop_kills_the_connection_and_does_not_apply(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    admin.fault(gateway="vai247", endpoint="refund", kind="drop", times=1)

    with pytest.raises(httpx.RemoteProtocolError):
        vai247_post(client, VAI247_REFUND, REFUND_10)

    assert admin.ledger() == []
    [call] = admin.calls()
    assert (call["fault"], call["http_status"]) == ("drop", None)
    # The same client (a fresh connection) works again afterwards.
    assert vai247_post(client, VAI247_REFUND, REFUND_10).status_code == 200


def test_apply_then_drop_applies_and_kills_the_connection(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    admin.fault(gateway="vai247", endpoint="refund", kind="apply_then_drop", times=1)

    with pytest.raises(httpx.RemoteProtocolError):
        vai247_post(client, VAI247_REFUND, REFUND_10)

    [entry] = admin.ledger()
    assert (entry["payment_ref"], entry["amount"]) == ("ord_1", "10")
    [call] = admin.calls()
    assert (call["fault"], call["http_status"]) == ("apply_then_drop", None)


def test_apply_then_drop_with_a_streaming_client_dies_mid_body(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    # The status line and headers arrive; the body never completes.
    admin.fault(gateway="vai247", endpoint="refund", kind="apply_then_drop")
    request = client.build_request(
        "POST", VAI247_REFUND, content=REFUND_10.encode(), headers=vai247_headers()
    )
    response = client.send(request, stream=True)
    try:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
    finally:
        response.close()


def test_malformed_applies_and_answers_200_with_non_json(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    admin.fault(gateway="vai247", endpoint="refund", kind="malformed", times=1)

    response = vai247_post(client, VAI247_REFUND, REFUND_10)

    assert response.status_code == 200
    with pytest.raises(ValueError):
        json.loads(response.content)
    assert len(admin.ledger()) == 1


def test_bad_signature_applies_with_a_wrong_pgv2_response_sign(
    client: httpx.Client, admin: Admin
) -> None:
    admin.payment("pgv2", "PAY-1", "100.00")
    admin.fault(gateway="pgv2", endpoint="refund", kind="bad_signature", times=1)
    body = {"merchantRefundNo": "R1", "paymentNo": "PAY-1", "amount": "10.00", "description": "x"}

    response = pgv2_post(client, PGV2_REFUND, body)

    assert response.status_code == 200
    assert response.json()["code"] == "OK"
    assert "sign=" in response.headers["authorization"]
    assert not pgv2_response_signature_ok(response)
    assert len(admin.ledger()) == 1
    # The next answer is signed correctly again.
    assert pgv2_response_signature_ok(pgv2_post(client, PGV2_QUERY, {"merchantRefundNo": "R1"}))


def test_bad_signature_exists_only_for_pgv2(client: httpx.Client) -> None:
    response = client.post(
        "/_admin/faults", json={"gateway": "vai247", "endpoint": "refund", "kind": "bad_signature"}
    )
    assert response.status_code == 422


def test_outage_answers_503_for_its_duration_then_recovers(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    rule = admin.fault(gateway="vai247", endpoint="*", kind="outage", duration_seconds=0.4)

    refund = vai247_post(client, VAI247_REFUND, REFUND_10)
    cancel = vai247_post(client, VAI247_CANCEL, '{"order_id":"ord_1"}')
    assert (refund.status_code, cancel.status_code) == (503, 503)
    assert admin.ledger() == []

    wait_until(lambda: vai247_post(client, VAI247_REFUND, REFUND_10).status_code == 200)
    assert len(admin.ledger()) == 1
    [listed] = [item for item in admin.faults() if item["id"] == rule["id"]]
    assert listed["active"] is False
    assert listed["fired"] >= 2


def test_times_limits_how_often_a_rule_fires(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    rule = admin.fault(gateway="vai247", endpoint="refund", kind="error", times=2)

    statuses = [vai247_post(client, VAI247_REFUND, REFUND_10).status_code for _ in range(4)]

    assert statuses == [503, 503, 200, 200]
    [listed] = admin.faults()
    assert (listed["id"], listed["fired"], listed["active"]) == (rule["id"], 2, False)
    assert [call["fault"] for call in admin.calls()] == ["error", "error", None, None]


@pytest.mark.parametrize(("probability", "expected"), [(0.0, 200), (1.0, 503)])
def test_probability_extremes(
    client: httpx.Client, admin: Admin, order: dict[str, Any], probability: float, expected: int
) -> None:
    admin.fault(gateway="vai247", endpoint="refund", kind="error", probability=probability)
    statuses = {
        vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":1}').status_code
        for _ in range(5)
    }
    assert statuses == {expected}


def test_probability_fires_on_some_calls(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    admin.fault(gateway="vai247", endpoint="refund", kind="error", probability=0.5)
    statuses = [
        vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":0.5}').status_code
        for _ in range(40)
    ]
    # Seeded (fault_seed=7): deterministic, and both outcomes occur.
    assert {200, 503} == set(statuses)
    assert admin.faults()[0]["fired"] == statuses.count(503)


def test_payment_ref_limits_a_rule_to_one_payment(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vai247", "ord_1", "100.00")
    admin.payment("vai247", "ord_2", "100.00")
    admin.fault(gateway="vai247", endpoint="refund", kind="error", payment_ref="ord_2")

    one = vai247_post(client, VAI247_REFUND, REFUND_10)
    two = vai247_post(client, VAI247_REFUND, '{"order_id":"ord_2","amount":10}')

    assert (one.status_code, two.status_code) == (200, 503)


def test_a_rule_for_one_endpoint_leaves_the_others_alone(
    client: httpx.Client, admin: Admin
) -> None:
    admin.payment("vai247", "ord_p", "100.00", status="pending")
    admin.fault(gateway="vai247", endpoint="refund", kind="error")

    assert vai247_post(client, VAI247_CANCEL, '{"order_id":"ord_p"}').status_code == 200


def test_faults_never_touch_the_admin_api(client: httpx.Client, admin: Admin) -> None:
    for gateway in ("vai247", "bbmsl", "vaultspay", "pgv2"):
        admin.fault(gateway=gateway, endpoint="*", kind="drop")
    assert client.get("/_admin/ledger").status_code == 200
    assert (
        client.post(
            "/_admin/pgv2/payments", json={"payment_ref": "p", "amount": "1.00"}
        ).status_code
        == 201
    )


def test_rules_can_be_listed_and_deleted(client: httpx.Client, admin: Admin) -> None:
    first = admin.fault(gateway="vai247", endpoint="refund", kind="error")
    admin.fault(gateway="pgv2", endpoint="query", kind="rate_limit")

    assert [rule["kind"] for rule in admin.faults()] == ["error", "rate_limit"]
    assert client.delete(f"/_admin/faults/{first['id']}").json() == {"deleted": 1}
    assert client.delete(f"/_admin/faults/{first['id']}").status_code == 404
    assert client.delete("/_admin/faults").json() == {"deleted": 1}
    assert admin.faults() == []


@pytest.mark.parametrize(
    "rule",
    [
        {"gateway": "vai247", "endpoint": "query", "kind": "error"},
        {"gateway": "nope", "endpoint": "*", "kind": "error"},
        {"gateway": "vai247", "kind": "latency"},
        {"gateway": "vai247", "kind": "outage"},
        {"gateway": "vai247", "kind": "explode"},
        {"gateway": "vai247", "kind": "error", "probability": 1.5},
        {"gateway": "vai247", "kind": "error", "times": 0},
        {"gateway": "vai247", "kind": "error", "surprise": True},
    ],
)
def test_invalid_rules_are_refused(client: httpx.Client, rule: dict[str, Any]) -> None:
    assert client.post("/_admin/faults", json=rule).status_code == 422


def test_one_fault_per_call_oldest_matching_rule_first(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    admin.fault(gateway="vai247", endpoint="refund", kind="rate_limit", times=1)
    admin.fault(gateway="vai247", endpoint="*", kind="error", times=1)

    statuses = [vai247_post(client, VAI247_REFUND, REFUND_10).status_code for _ in range(3)]

    assert statuses == [429, 503, 200]


# ---- every gateway endpoint honours faults and logs the key ----


def test_bbmsl_apply_then_drop_and_drop(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    admin.payment("bbmsl", "shop-1", "100.00")
    admin.payment("bbmsl", "shop-2", "100.00")
    admin.fault(gateway="bbmsl", endpoint="refund", kind="drop", payment_ref="shop-1")
    admin.fault(gateway="bbmsl", endpoint="refund", kind="apply_then_drop", payment_ref="shop-2")

    for reference in ("shop-1", "shop-2"):
        request = f'{{"merchantId":3,"merchantReference":"{reference}","amount":5}}'
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(BBMSL_REFUND, json=bbmsl_envelope(bbmsl_private_key, request))

    assert [entry["payment_ref"] for entry in admin.ledger()] == ["shop-2"]
    assert {call["key"]: call["fault"] for call in admin.calls(gateway="bbmsl")} == {
        "shop-1": "drop",
        "shop-2": "apply_then_drop",
    }


def test_vaultspay_faults_on_auth_create_and_status(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    admin.fault(gateway="vaultspay", endpoint="auth", kind="error", times=1)
    credentials = {"clientId": "sandbox-client", "clientSecret": "sandbox-secret"}
    assert client.post(VAULTSPAY_AUTH, json=credentials).status_code == 503
    token = vaultspay_token(client)

    admin.fault(gateway="vaultspay", endpoint="create", kind="apply_then_drop", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(
            VAULTSPAY_CREATE,
            json={"transactionId": "PL_1", "isPartial": "1", "amount": "5.00"},
            headers=bearer(token),
        )
    [entry] = admin.ledger()

    admin.fault(gateway="vaultspay", endpoint="status", kind="malformed", times=1)
    response = client.post(
        VAULTSPAY_STATUS, json={"uuid": entry["reference"]}, headers=bearer(token)
    )
    assert response.status_code == 200
    with pytest.raises(ValueError):
        json.loads(response.content)
    [status_call] = admin.calls(endpoint="status")
    assert (status_call["key"], status_call["payment_ref"], status_call["fault"]) == (
        entry["reference"],
        "PL_1",
        "malformed",
    )


def test_pgv2_query_faults_are_logged_under_the_merchant_refund_no(
    client: httpx.Client, admin: Admin
) -> None:
    admin.payment("pgv2", "PAY-1", "100.00")
    body = {"merchantRefundNo": "R1", "paymentNo": "PAY-1", "amount": "10.00", "description": "x"}
    created = pgv2_post(client, PGV2_REFUND, body).json()["data"]
    admin.fault(gateway="pgv2", endpoint="query", kind="drop", payment_ref="PAY-1")

    with pytest.raises(httpx.RemoteProtocolError):
        pgv2_post(client, PGV2_QUERY, {"refundNo": created["refundNo"]})

    calls = admin.calls(gateway="pgv2", key="R1")
    assert [(call["endpoint"], call["fault"]) for call in calls] == [
        ("refund", None),
        ("query", "drop"),
    ]


def test_malformed_turns_a_refusal_into_an_unreadable_200(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    admin.fault(gateway="vai247", endpoint="refund", kind="malformed")

    response = vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":1000}')

    assert response.status_code == 200
    with pytest.raises(ValueError):
        json.loads(response.content)
    assert admin.ledger() == []


def test_a_client_that_gives_up_during_latency_still_gets_its_refund_applied(
    client: httpx.Client, admin: Admin, order: dict[str, Any]
) -> None:
    # Apply-then-timeout as a real client lives it: the read times out, the client hangs up,
    # and the gateway applies the refund anyway.
    admin.fault(gateway="vai247", endpoint="refund", kind="latency", latency_ms=400, times=1)

    with pytest.raises(httpx.ReadTimeout):
        client.post(
            VAI247_REFUND,
            content=REFUND_10.encode(),
            headers=vai247_headers(),
            timeout=httpx.Timeout(5.0, read=0.1),
        )

    [entry] = wait_until(admin.ledger, timeout=5.0)
    assert entry["payment_ref"] == "ord_1"
