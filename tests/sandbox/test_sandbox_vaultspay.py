"""vaultspay simulator: bearer tokens, refund requests, life cycle, callbacks."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from tests.sandbox.gateway_kit import (
    VAULTSPAY_AUTH,
    VAULTSPAY_CREATE,
    VAULTSPAY_STATUS,
    Admin,
    CallbackReceiver,
    bearer,
    vaultspay_token,
    wait_until,
)

UNAUTHENTICATED = {"message": "Unauthenticated.", "code": "401", "data": None}


def create(client: httpx.Client, token: str, **fields: Any) -> httpx.Response:
    return client.post(VAULTSPAY_CREATE, json=fields, headers=bearer(token))


def status_of(client: httpx.Client, token: str, refund_uuid: str) -> dict[str, Any]:
    response = client.post(VAULTSPAY_STATUS, json={"uuid": refund_uuid}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def set_status(client: httpx.Client, refund_uuid: str, status: int) -> dict[str, Any]:
    response = client.post(
        f"/_admin/vaultspay/refund-requests/{refund_uuid}/status", json={"status": status}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_merchant_auth_issues_an_expiring_token(client: httpx.Client) -> None:
    response = client.post(
        VAULTSPAY_AUTH, json={"clientId": "sandbox-client", "clientSecret": "sandbox-secret"}
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["message"], body["code"]) == ("Successful.", "200")
    assert body["data"]["token_expiry"] == 3600
    assert len(body["data"]["access_token"]) >= 32


@pytest.mark.parametrize(
    "credentials",
    [
        {"clientId": "sandbox-client", "clientSecret": "wrong"},
        {"clientId": "someone", "clientSecret": "sandbox-secret"},
    ],
)
def test_wrong_client_credentials_get_401(
    client: httpx.Client, credentials: dict[str, str]
) -> None:
    response = client.post(VAULTSPAY_AUTH, json=credentials)
    assert response.status_code == 401
    assert response.json() == {
        "message": "Invalid client credentials.",
        "code": "401",
        "data": None,
    }


def test_missing_client_credentials_are_invalid_data(client: httpx.Client) -> None:
    response = client.post(VAULTSPAY_AUTH, json={"clientId": "sandbox-client"})
    assert response.status_code == 422
    assert response.json()["message"] == "The given data was invalid."


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}],
    ids=["missing", "unknown", "wrong-scheme"],
)
def test_endpoints_need_a_valid_bearer_token(
    client: httpx.Client, admin: Admin, headers: dict[str, str]
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    created = client.post(
        VAULTSPAY_CREATE,
        json={"transactionId": "PL_1", "isPartial": "1", "amount": "1.00"},
        headers=headers,
    )
    queried = client.post(VAULTSPAY_STATUS, json={"uuid": "RFRQ_X"}, headers=headers)
    assert (created.status_code, created.json()) == (401, UNAUTHENTICATED)
    assert (queried.status_code, queried.json()) == (401, UNAUTHENTICATED)
    assert admin.ledger() == []


def test_expired_tokens_get_401_and_a_new_token_works(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)

    expired = client.post("/_admin/vaultspay/tokens/expire").json()
    refused = create(client, token, transactionId="PL_1", isPartial="1", amount="1.00")
    accepted = create(
        client, vaultspay_token(client), transactionId="PL_1", isPartial="1", amount="1.00"
    )

    assert expired == {"expired": 1}
    assert (refused.status_code, refused.json()) == (401, UNAUTHENTICATED)
    assert accepted.status_code == 200


def test_token_lifetime_follows_the_setting(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    settings = client.post("/_admin/vaultspay/settings", json={"token_ttl_seconds": 0}).json()
    assert settings["token_ttl_seconds"] == 0

    response = client.post(
        VAULTSPAY_AUTH, json={"clientId": "sandbox-client", "clientSecret": "sandbox-secret"}
    )
    token = response.json()["data"]["access_token"]

    assert response.json()["data"]["token_expiry"] == 0
    refused = create(client, token, transactionId="PL_1", isPartial="1", amount="1.00")
    assert refused.status_code == 401


def test_partial_refund_request_has_documented_shape(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vaultspay", "PL_xyz", "100.00", currency="AED")
    token = vaultspay_token(client)

    response = create(client, token, transactionId="PL_xyz", isPartial="1", amount="50.50")

    assert response.status_code == 200
    body = response.json()
    assert (body["message"], body["code"]) == ("Successful.", "200")
    data = body["data"]
    assert re.fullmatch(
        r"RFRQ_[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}", data["uuid"]
    )
    assert data["transaction_id"] == "PL_xyz"
    assert data["is_partial"] == "1"
    assert data["amount"] == "50.50"
    assert isinstance(data["id"], str)
    assert data["created_at"].endswith("Z")
    assert "status" not in data
    [entry] = admin.ledger(gateway="vaultspay")
    assert (entry["payment_ref"], entry["reference"], entry["amount"]) == (
        "PL_xyz",
        data["uuid"],
        "50.50",
    )
    assert (entry["status"], entry["effective"], entry["currency"]) == (0, True, "AED")


def test_status_query_reports_pending_then_not_found_for_unknown(
    client: httpx.Client, admin: Admin
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)
    refund_uuid = create(client, token, transactionId="PL_1", isPartial="1", amount="10").json()[
        "data"
    ]["uuid"]

    data = status_of(client, token, refund_uuid)
    missing = client.post(VAULTSPAY_STATUS, json={"uuid": "RFRQ_NOPE"}, headers=bearer(token))

    assert data["status"] == 0
    assert data["status_str"] == "Pending"
    assert (data["uuid"], data["transaction_id"], data["amount"]) == (refund_uuid, "PL_1", "10")
    assert missing.status_code == 404
    assert missing.json() == {"message": "Refund request not found.", "code": "404", "data": None}


def test_full_refund_refunds_the_whole_transaction(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vaultspay", "PL_1", "80.00")
    admin.payment("vaultspay", "PL_2", "80.00")
    token = vaultspay_token(client)

    without_amount = create(client, token, transactionId="PL_1", isPartial="0")
    with_null_flag = create(client, token, transactionId="PL_2", amount="80.00")
    wrong_amount = create(client, token, transactionId="PL_1", isPartial="0", amount="70.00")

    assert without_amount.json()["data"]["amount"] == "80.00"
    assert without_amount.json()["data"]["is_partial"] == "0"
    assert with_null_flag.status_code == 200
    assert wrong_amount.status_code == 422
    assert [entry["amount"] for entry in admin.ledger()] == ["80.00", "80.00"]


def test_partial_must_be_less_than_full_and_total_within_refundable(
    client: httpx.Client, admin: Admin
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)

    equal = create(client, token, transactionId="PL_1", isPartial="1", amount="100.00")
    first = create(client, token, transactionId="PL_1", isPartial="1", amount="60.00")
    over = create(client, token, transactionId="PL_1", isPartial="1", amount="40.01")
    full_after_partial = create(client, token, transactionId="PL_1", isPartial="0")

    assert equal.status_code == 422
    assert equal.json()["message"] == "The amount must be less than the transaction full amount."
    assert first.status_code == 200
    exceeds = "The refund amount exceeds the refundable amount of the transaction."
    assert (over.status_code, over.json()["message"]) == (422, exceeds)
    assert (full_after_partial.status_code, full_after_partial.json()["code"]) == (422, "422")
    assert len(admin.ledger()) == 1


def test_rejected_or_cancelled_requests_free_the_amount_but_stay_in_the_ledger(
    client: httpx.Client, admin: Admin
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)
    first = create(client, token, transactionId="PL_1", isPartial="1", amount="90.00").json()
    second = create(client, token, transactionId="PL_1", isPartial="1", amount="90.00").json()

    set_status(client, first["data"]["uuid"], 4)
    retried = create(client, token, transactionId="PL_1", isPartial="1", amount="90.00")
    set_status(client, retried.json()["data"]["uuid"], 3)

    assert second["code"] == "422"
    assert retried.status_code == 200
    entries = admin.ledger(gateway="vaultspay")
    assert [(entry["status"], entry["effective"]) for entry in entries] == [
        (4, False),
        (3, False),
    ]
    assert admin.get_payment("vaultspay", "PL_1")["refunded_amount"] == "0.00"


@pytest.mark.parametrize(
    "fields",
    [
        {"isPartial": "1", "amount": "1.00"},
        {"transactionId": "PL_1", "isPartial": "1"},
        {"transactionId": "PL_1", "isPartial": "1", "amount": 1.5},
        {"transactionId": "PL_1", "isPartial": "1", "amount": "abc"},
        {"transactionId": "PL_1", "isPartial": "1", "amount": "1.234"},
        {"transactionId": "PL_1", "isPartial": "1", "amount": "0.00"},
        {"transactionId": "PL_1", "isPartial": "yes", "amount": "1.00"},
        {"transactionId": "PL_1", "isPartial": "1", "amount": "1", "callbackHookUrl": "ftp://x"},
    ],
)
def test_invalid_create_data_gets_422(
    client: httpx.Client, admin: Admin, fields: dict[str, Any]
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    response = create(client, vaultspay_token(client), **fields)
    assert response.status_code == 422
    assert response.json() == {
        "message": "The given data was invalid.",
        "code": "422",
        "data": None,
    }


def test_unknown_transaction_gets_404(client: httpx.Client) -> None:
    response = create(
        client, vaultspay_token(client), transactionId="PL_none", isPartial="1", amount="1.00"
    )
    assert response.status_code == 404
    assert response.json() == {"message": "Transaction not found.", "code": "404", "data": None}


def test_admin_drives_the_life_cycle_and_callbacks_fire_on_2(
    client: httpx.Client, admin: Admin, callback_receiver: CallbackReceiver
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)
    refund_uuid = create(
        client,
        token,
        transactionId="PL_1",
        isPartial="1",
        amount="25.00",
        callbackHookUrl=callback_receiver.url,
    ).json()["data"]["uuid"]

    set_status(client, refund_uuid, 1)
    assert status_of(client, token, refund_uuid)["status_str"] == "Initiated"
    assert callback_receiver.bodies() == []
    view = set_status(client, refund_uuid, 2)

    [callback] = callback_receiver.wait_for(1)
    assert callback == {
        "vpTransactionId": view["vp_transaction_id"],
        "clientReference": refund_uuid,
        "amount": "25.00",
        "fee": "0",
        "vat": "0",
        "status": "SUCCESS",
        "referenceId": refund_uuid,
    }
    assert callback["vpTransactionId"].startswith("RF_")
    assert callback_receiver.received[0]["path"] == "/hook/secret-token"
    assert callback_receiver.received[0]["content_type"] == "application/json"
    assert status_of(client, token, refund_uuid)["status_str"] == "Processed"
    [entry] = admin.ledger()
    assert (entry["status"], entry["effective"]) == (2, True)
    calls = wait_until(lambda: admin.calls(endpoint="callback"))
    assert (calls[0]["key"], calls[0]["http_status"]) == (refund_uuid, 200)


def test_rejection_calls_back_rejected_and_cancellation_does_not_call_back(
    client: httpx.Client, admin: Admin, callback_receiver: CallbackReceiver
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)

    def open_request() -> str:
        response = create(
            client,
            token,
            transactionId="PL_1",
            isPartial="1",
            amount="5.00",
            callbackHookUrl=callback_receiver.url,
        )
        return str(response.json()["data"]["uuid"])

    rejected, cancelled = open_request(), open_request()
    set_status(client, cancelled, 3)
    set_status(client, rejected, 4)

    [callback] = callback_receiver.wait_for(1)
    assert (callback["status"], callback["referenceId"]) == ("REJECTED", rejected)
    # Deliveries are in order of status changes; the cancel came first and sent nothing.
    assert admin.calls(endpoint="callback", key=cancelled) == []


def test_callbacks_can_be_delivered_again(
    client: httpx.Client, admin: Admin, callback_receiver: CallbackReceiver
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)
    refund_uuid = create(
        client, token, transactionId="PL_1", isPartial="0", callbackHookUrl=callback_receiver.url
    ).json()["data"]["uuid"]
    too_early = client.post(f"/_admin/vaultspay/refund-requests/{refund_uuid}/callback")

    set_status(client, refund_uuid, 2)
    callback_receiver.wait_for(1)
    again = client.post(f"/_admin/vaultspay/refund-requests/{refund_uuid}/callback")

    assert too_early.status_code == 409
    assert again.status_code == 200
    first, second = callback_receiver.wait_for(2)
    assert first == second


def test_failed_callback_is_logged_and_not_fatal(
    client: httpx.Client, admin: Admin, callback_receiver: CallbackReceiver
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)
    callback_receiver.status = 500
    answered_500 = create(
        client,
        token,
        transactionId="PL_1",
        isPartial="1",
        amount="1.00",
        callbackHookUrl=callback_receiver.url,
    ).json()["data"]["uuid"]
    unreachable = create(
        client,
        token,
        transactionId="PL_1",
        isPartial="1",
        amount="1.00",
        # Port 9 (discard) on loopback: nothing listens there, the connection is refused.
        callbackHookUrl="http://127.0.0.1:9/hook",
    ).json()["data"]["uuid"]

    set_status(client, answered_500, 2)
    set_status(client, unreachable, 4)

    calls = wait_until(
        lambda: len(admin.calls(endpoint="callback")) == 2 and admin.calls(endpoint="callback")
    )
    by_key = {call["key"]: call for call in calls}
    assert by_key[answered_500]["http_status"] == 500
    assert by_key[unreachable]["http_status"] is None
    assert by_key[unreachable]["error"]
    assert status_of(client, token, unreachable)["status"] == 4


def test_auto_advance_moves_requests_through_the_life_cycle(
    client: httpx.Client, admin: Admin, callback_receiver: CallbackReceiver
) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    settings = client.post(
        "/_admin/vaultspay/settings",
        json={
            "auto_advance": {
                "initiated_after_seconds": 0.2,
                "final_after_seconds": 0.5,
                "final_status": 2,
            }
        },
    ).json()
    assert settings["auto_advance"]["final_status"] == 2
    token = vaultspay_token(client)
    refund_uuid = create(
        client,
        token,
        transactionId="PL_1",
        isPartial="1",
        amount="7.00",
        callbackHookUrl=callback_receiver.url,
    ).json()["data"]["uuid"]

    seen: list[int] = []

    def processed() -> bool:
        seen.append(status_of(client, token, refund_uuid)["status"])
        return seen[-1] == 2

    wait_until(processed, timeout=5.0)
    assert seen[0] in (0, 1)
    assert seen == sorted(seen)  # never moves backwards
    [callback] = callback_receiver.wait_for(1)
    assert callback["status"] == "SUCCESS"


def test_auto_advance_to_rejected_without_polling(
    client: httpx.Client, admin: Admin, callback_receiver: CallbackReceiver
) -> None:
    # Nobody polls: the timer alone must reach the final state and send the callback.
    admin.payment("vaultspay", "PL_1", "100.00")
    client.post(
        "/_admin/vaultspay/settings",
        json={"auto_advance": {"final_after_seconds": 0.2, "final_status": 4}},
    )
    token = vaultspay_token(client)
    create(
        client,
        token,
        transactionId="PL_1",
        isPartial="1",
        amount="7.00",
        callbackHookUrl=callback_receiver.url,
    )

    [callback] = callback_receiver.wait_for(1)

    assert callback["status"] == "REJECTED"
    [entry] = admin.ledger()
    assert (entry["status"], entry["effective"]) == (4, False)


def test_admin_command_stops_auto_advance(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    client.post(
        "/_admin/vaultspay/settings",
        json={"auto_advance": {"final_after_seconds": 0.3, "final_status": 2}},
    )
    token = vaultspay_token(client)
    refund_uuid = create(client, token, transactionId="PL_1", isPartial="0").json()["data"]["uuid"]

    view = set_status(client, refund_uuid, 4)
    assert view["auto_advance"] is None
    # Proving that something does *not* happen takes waiting past the moment it would have:
    # 0.2 s beyond the 0.3 s delay.
    time.sleep(0.5)
    assert status_of(client, token, refund_uuid)["status"] == 4
    client.post("/_admin/vaultspay/settings", json={"auto_advance": None})
    assert client.get("/_admin/vaultspay/settings").json()["auto_advance"] is None


def test_admin_refund_request_view_and_404(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)
    refund_uuid = create(client, token, transactionId="PL_1", isPartial="0").json()["data"]["uuid"]

    view = client.get(f"/_admin/vaultspay/refund-requests/{refund_uuid}").json()

    assert (view["uuid"], view["status"], view["is_partial"]) == (refund_uuid, 0, "0")
    assert client.get("/_admin/vaultspay/refund-requests/RFRQ_NONE").status_code == 404
    missing = client.post("/_admin/vaultspay/refund-requests/RFRQ_NONE/status", json={"status": 2})
    assert missing.status_code == 404
    bad = client.post(f"/_admin/vaultspay/refund-requests/{refund_uuid}/status", json={"status": 5})
    assert bad.status_code == 422
