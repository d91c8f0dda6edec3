"""bbmsl simulator: SHA256withRSA envelopes, once-per-order refunds, balance, order query."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.sandbox.gateway_kit import BBMSL_QUERY, BBMSL_REFUND, Admin, bbmsl_envelope, bbmsl_post


def test_refund_by_order_id_returns_documented_body_and_ledger_entry(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    payment = admin.payment("bbmsl", "1655817171", "15.00", currency="USD")
    order_id = payment["order_id"]
    assert isinstance(order_id, int)

    response = client.post(
        BBMSL_REFUND,
        json=bbmsl_envelope(
            bbmsl_private_key, f'{{"merchantId":3,"orderId":{order_id},"amount":10}}'
        ),
    )

    assert response.status_code == 200
    body = json.loads(response.content, parse_float=Decimal)
    assert body["responseCode"] == "0000"
    order, transaction = body["order"], body["transaction"]
    assert order["id"] == order_id
    assert order["merchantId"] == 3
    assert order["merchantReference"] == "1655817171"
    assert order["currency"] == "USD"
    assert order["amount"] == Decimal("15.00")
    assert order["netAmount"] == Decimal("5.00")
    assert order["status"] == "REFUNDED"
    assert order["recurring"] is False
    assert {"cardType", "email", "createTime", "updateTime"} <= order.keys()
    assert transaction["type"] == "REFUND"
    assert transaction["status"] == "SUCCESS"
    assert transaction["amount"] == 10
    assert transaction["currency"] == "USD"
    assert isinstance(transaction["id"], int)
    assert {"merchantId", "maskedPan", "stan"} <= transaction.keys()
    [entry] = admin.ledger(gateway="bbmsl")
    assert entry["payment_ref"] == "1655817171"  # the merchantReference, not the orderId
    assert entry["reference"] == str(transaction["id"])
    assert entry["amount"] == "10"


def test_refund_by_merchant_reference_and_only_once_per_order(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    admin.payment("bbmsl", "shop-42", "100.00")
    request = '{"merchantId":"3","merchantReference":"shop-42","amount":30.50}'

    first = bbmsl_post(client, BBMSL_REFUND, bbmsl_private_key, request)
    second = bbmsl_post(client, BBMSL_REFUND, bbmsl_private_key, request)

    assert first["responseCode"] == "0000"
    assert second == {"responseCode": "3002", "message": "Order already refunded"}
    assert len(admin.ledger(payment_ref="shop-42")) == 1


@pytest.mark.parametrize("tamper", ["other-key", "changed-text", "garbage", "missing"])
def test_bad_signature_is_1001_and_nothing_is_applied(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey, tamper: str
) -> None:
    admin.payment("bbmsl", "shop-1", "100.00")
    request = '{"merchantId":3,"merchantReference":"shop-1","amount":10}'
    envelope = bbmsl_envelope(bbmsl_private_key, request)
    if tamper == "other-key":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        envelope = bbmsl_envelope(other, request)
    elif tamper == "changed-text":
        # Same JSON meaning, different bytes: the signature covers the exact text.
        envelope["request"] = request.replace(":10}", ": 10}")
    elif tamper == "garbage":
        envelope["signature"] = "not base64!!"
    else:
        del envelope["signature"]

    response = client.post(BBMSL_REFUND, json=envelope)

    assert response.status_code == 200
    assert response.json() == {"responseCode": "1001", "message": "Invalid signature"}
    assert admin.ledger() == []


def test_without_a_merchant_public_key_every_request_is_1001(
    client: httpx.Client,
    admin: Admin,
    bbmsl_private_key: rsa.RSAPrivateKey,
    bbmsl_key_paths: tuple[Path, Path],
) -> None:
    admin.payment("bbmsl", "shop-1", "100.00")
    request = '{"merchantId":3,"merchantReference":"shop-1","amount":10}'
    removed = client.post("/_admin/bbmsl/merchant", json={"public_key_pem": None})
    assert removed.json()["has_public_key"] is False

    refused = bbmsl_post(client, BBMSL_REFUND, bbmsl_private_key, request)

    assert refused["responseCode"] == "1001"
    # Installing the key through the admin API makes the same request verify.
    installed = client.post(
        "/_admin/bbmsl/merchant", json={"public_key_pem": bbmsl_key_paths[1].read_text()}
    )
    assert installed.json()["has_public_key"] is True
    assert bbmsl_post(client, BBMSL_REFUND, bbmsl_private_key, request)["responseCode"] == "0000"


def test_admin_refuses_a_public_key_that_is_not_rsa_pem(client: httpx.Client) -> None:
    response = client.post("/_admin/bbmsl/merchant", json={"public_key_pem": "nonsense"})
    assert response.status_code == 422


def test_unknown_merchant_is_1002(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    admin.payment("bbmsl", "shop-1", "100.00")
    body = bbmsl_post(
        client,
        BBMSL_REFUND,
        bbmsl_private_key,
        '{"merchantId":4,"merchantReference":"shop-1","amount":10}',
    )
    assert body == {"responseCode": "1002", "message": "Invalid merchant"}


@pytest.mark.parametrize(
    "request_text",
    [
        '{"merchantId":3,"amount":10}',
        '{"merchantId":3,"merchantReference":"shop-1","amount":"10"}',
        '{"merchantId":3,"merchantReference":"shop-1","amount":10.001}',
        '{"merchantId":3,"merchantReference":"shop-1","amount":1234567890}',
        '{"merchantId":3,"merchantReference":"shop-1","amount":0}',
        '{"merchantId":3,"merchantReference":"shop-1"}',
        '{"merchantId":3,"orderId":"10001","amount":10}',
        '{"merchantReference":"shop-1","amount":10}',
        "not json at all",
    ],
)
def test_malformed_inner_request_is_2001(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey, request_text: str
) -> None:
    admin.payment("bbmsl", "shop-1", "100.00")

    body = bbmsl_post(client, BBMSL_REFUND, bbmsl_private_key, request_text)

    assert body["responseCode"] == "2001"
    assert admin.ledger() == []


def test_business_refusals(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    admin.payment("bbmsl", "big", "100.00")
    admin.payment("bbmsl", "open", "100.00", status="OPEN")
    admin.payment("bbmsl", "settled", "100.00", status="SETTLED")

    def refund(reference: str, amount: str) -> str:
        request = f'{{"merchantId":3,"merchantReference":"{reference}","amount":{amount}}}'
        return str(bbmsl_post(client, BBMSL_REFUND, bbmsl_private_key, request)["responseCode"])

    assert refund("missing", "1") == "3001"
    assert refund("big", "100.01") == "3003"
    assert refund("open", "1") == "3005"
    client.post("/_admin/bbmsl/merchant", json={"unsettled_balance": "20.00"})
    assert refund("big", "20.01") == "3004"
    assert refund("settled", "20.00") == "0000"  # SETTLED orders are refundable
    assert client.get("/_admin/bbmsl/merchant").json()["unsettled_balance"] == "0.00"
    assert [entry["payment_ref"] for entry in admin.ledger()] == ["settled"]


def test_reset_restores_the_unsettled_balance(client: httpx.Client, admin: Admin) -> None:
    client.post("/_admin/bbmsl/merchant", json={"unsettled_balance": "1.00"})
    client.post("/_admin/reset")
    assert client.get("/_admin/bbmsl/merchant").json()["unsettled_balance"] == "1000000000.00"


def test_query_reports_the_order_before_and_after_refund(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    payment = admin.payment("bbmsl", "shop-9", "50.00")
    by_id = f'{{"merchantId":3,"orderId":{payment["order_id"]}}}'
    by_reference = '{"merchantId":3,"merchantReference":"shop-9"}'

    before = bbmsl_post(client, BBMSL_QUERY, bbmsl_private_key, by_id)
    bbmsl_post(
        client,
        BBMSL_REFUND,
        bbmsl_private_key,
        '{"merchantId":3,"merchantReference":"shop-9","amount":20}',
    )
    after = bbmsl_post(client, BBMSL_QUERY, bbmsl_private_key, by_reference)
    missing = bbmsl_post(
        client, BBMSL_QUERY, bbmsl_private_key, '{"merchantId":3,"merchantReference":"none"}'
    )

    assert before["responseCode"] == "0000"
    assert before["message"] == "Success"
    assert "transaction" not in before
    assert (before["order"]["status"], before["order"]["netAmount"]) == ("SUCCESS", 50.0)
    assert after["order"]["status"] == "REFUNDED"
    assert Decimal(str(after["order"]["amount"])) - Decimal(str(after["order"]["netAmount"])) == 20
    assert missing["responseCode"] == "3001"
    assert len(admin.ledger()) == 1  # queries never apply anything


def test_query_needs_a_valid_signature(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    admin.payment("bbmsl", "shop-9", "50.00")
    envelope = bbmsl_envelope(bbmsl_private_key, '{"merchantId":3,"merchantReference":"shop-9"}')
    envelope["request"] = '{"merchantId":3,"merchantReference":"shop-8"}'
    assert client.post(BBMSL_QUERY, json=envelope).json()["responseCode"] == "1001"


def test_calls_addressed_by_order_id_are_logged_under_the_merchant_reference(
    client: httpx.Client, admin: Admin, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    payment = admin.payment("bbmsl", "shop-7", "50.00")
    bbmsl_post(
        client,
        BBMSL_QUERY,
        bbmsl_private_key,
        f'{{"merchantId":3,"orderId":{payment["order_id"]}}}',
    )
    [call] = admin.calls(gateway="bbmsl", key="shop-7")
    assert (call["endpoint"], call["http_status"], call["fault"]) == ("query", 200, None)
