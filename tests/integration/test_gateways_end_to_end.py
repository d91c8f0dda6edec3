"""bbmsl, vaultspay and pgv2 end to end, through Redis, a prefork worker, beat and the sandbox,
on SQLite and PostgreSQL. Refusals carry the gateway's own code and message; ambiguity is
resolved per gateway by rule 5; counts come from the sandbox ledger."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.polling import wait_for
from tests.support.stack import REPO, Stack, unique
from worker.client import enqueue_refund, get_job_detail

FINAL = {"succeeded", "declined", "failed", "unknown"}


def payment(stack: Stack, gateway: str, amount: str, currency: str, **kw: str) -> str:
    ref = unique(gateway)
    stack.sandbox.create_payment(gateway, ref, amount, currency, **kw)
    return ref


def effective(stack: Stack, gateway: str, ref: str) -> list[dict]:
    return [e for e in stack.sandbox.ledger(gateway, ref) if e.get("effective", True)]


# ---- bbmsl ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("amount", "refund"), [("100.00", "100.00"), ("100.00", "35.50")])
def test_bbmsl_full_and_partial_refunds_succeed(running: Stack, amount: str, refund: str):
    ref = payment(running, "bbmsl", amount, "HKD")
    job = enqueue_refund(
        provider="bbmsl",
        payment_ref=ref,
        amount=refund,
        currency="HKD",
        idempotency_key=unique("k"),
        original_amount=amount,
    )
    done = running.wait_status(job.id, FINAL)
    (entry,) = running.sandbox.ledger("bbmsl", ref)
    assert done.status == "succeeded"
    assert entry["amount"] == refund
    assert done.provider_reference == str(entry["reference"])
    order = running.sandbox.payment("bbmsl", ref)
    assert order["status"] == "REFUNDED"


def test_bbmsl_refund_by_numeric_order_id(running: Stack):
    ref = unique("bbmsl")
    created = running.sandbox.create_payment("bbmsl", ref, "80.00", "HKD")
    job = enqueue_refund(
        provider="bbmsl",
        payment_ref=ref,
        amount="80.00",
        currency="HKD",
        idempotency_key=unique("k"),
        order_id=str(created["order_id"]),
    )
    assert running.wait_status(job.id, FINAL).status == "succeeded"
    assert [e["payment_ref"] for e in running.sandbox.ledger("bbmsl", ref)] == [ref]


def test_bbmsl_second_refund_of_an_order_is_declined_with_the_gateways_code(running: Stack):
    # Refunded once already outside refundq (the merchant portal): the gateway says no.
    ref = payment(running, "bbmsl", "50.00", "HKD", status="REFUNDED")
    job = enqueue_refund(
        provider="bbmsl",
        payment_ref=ref,
        amount="10.00",
        currency="HKD",
        idempotency_key=unique("k"),
    )
    done = running.wait_status(job.id, FINAL)
    assert done.status == "declined"
    assert (done.last_error.code, done.last_error.message) == ("3002", "Order already refunded")
    assert running.sandbox.ledger("bbmsl", ref) == []


def test_bbmsl_insufficient_unsettled_balance_is_declined(running: Stack):
    ref = payment(running, "bbmsl", "500.00", "HKD")
    before = running.sandbox.get("/bbmsl/merchant")["unsettled_balance"]
    running.sandbox.post("/bbmsl/merchant", {"unsettled_balance": "100.00"})
    try:
        job = enqueue_refund(
            provider="bbmsl",
            payment_ref=ref,
            amount="200.00",
            currency="HKD",
            idempotency_key=unique("k"),
        )
        done = running.wait_status(job.id, FINAL)
    finally:
        running.sandbox.post("/bbmsl/merchant", {"unsettled_balance": before})
    assert done.status == "declined"
    assert done.last_error.code == "3004"
    assert "unsettled balance" in done.last_error.message.lower()


def test_bbmsl_apply_then_drop_is_resolved_by_the_order_query_as_succeeded(running: Stack):
    ref = payment(running, "bbmsl", "60.00", "HKD")
    running.sandbox.fault("bbmsl", "refund", "apply_then_drop", times=1, payment_ref=ref)
    job = enqueue_refund(
        provider="bbmsl",
        payment_ref=ref,
        amount="60.00",
        currency="HKD",
        idempotency_key=unique("k"),
    )
    done = running.wait_status(job.id, FINAL)
    assert done.status == "succeeded"
    assert len(running.sandbox.ledger("bbmsl", ref)) == 1
    purposes = [(a.purpose, a.outcome) for a in get_job_detail(job.id).attempt_log]
    assert purposes == [("send", "ambiguous"), ("status", "succeeded")]
    assert len(running.sandbox.calls("bbmsl", "refund", key=ref)) == 1


def test_bbmsl_drop_before_the_gateway_acted_is_queried_then_sent_again_once(running: Stack):
    ref = payment(running, "bbmsl", "60.00", "HKD")
    running.sandbox.fault("bbmsl", "refund", "drop", times=1, payment_ref=ref)
    job = enqueue_refund(
        provider="bbmsl",
        payment_ref=ref,
        amount="60.00",
        currency="HKD",
        idempotency_key=unique("k"),
    )
    done = running.wait_status(job.id, FINAL)
    assert done.status == "succeeded"
    assert len(running.sandbox.ledger("bbmsl", ref)) == 1
    purposes = [(a.purpose, a.outcome) for a in get_job_detail(job.id).attempt_log]
    assert purposes == [("send", "ambiguous"), ("status", "not_found"), ("send", "succeeded")]


# ---- pgv2 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("amount", "refund"), [("250.00", "250.00"), ("250.00", "100.05")])
def test_pgv2_full_and_partial_refunds_succeed(running: Stack, amount: str, refund: str):
    ref = payment(running, "pgv2", amount, "INR")
    job = enqueue_refund(
        provider="pgv2",
        payment_ref=ref,
        amount=refund,
        currency="INR",
        idempotency_key=unique("k"),
        reason="User requested refund",
    )
    done = running.wait_status(job.id, FINAL)
    (entry,) = running.sandbox.ledger("pgv2", ref)
    assert done.status == "succeeded"
    assert (entry["amount"], entry["merchant_reference"]) == (refund, job.id)
    assert done.provider_reference == entry["reference"]


def test_pgv2_amount_above_the_payment_is_declined_with_the_gateways_message(running: Stack):
    ref = payment(running, "pgv2", "10.00", "INR")
    job = enqueue_refund(
        provider="pgv2",
        payment_ref=ref,
        amount="10.01",
        currency="INR",
        idempotency_key=unique("k"),
    )
    done = running.wait_status(job.id, FINAL)
    assert done.status == "declined"
    assert done.last_error.code == "REFUND_AMOUNT_EXCEEDED"
    assert done.last_error.message
    assert running.sandbox.ledger("pgv2", ref) == []


@pytest.mark.parametrize("duplicate_mode", ["replay", "refuse"])
def test_pgv2_apply_then_drop_is_resolved_by_the_inquiry_whatever_duplicates_get(
    running: Stack, duplicate_mode: str
):
    running.sandbox.post("/pgv2/settings", {"duplicate_mode": duplicate_mode})
    try:
        ref = payment(running, "pgv2", "40.00", "INR")
        running.sandbox.fault("pgv2", "refund", "apply_then_drop", times=1, payment_ref=ref)
        job = enqueue_refund(
            provider="pgv2",
            payment_ref=ref,
            amount="40.00",
            currency="INR",
            idempotency_key=unique("k"),
        )
        done = running.wait_status(job.id, FINAL)
    finally:
        running.sandbox.post("/pgv2/settings", {"duplicate_mode": "replay"})
    assert done.status == "succeeded"
    assert len(running.sandbox.ledger("pgv2", ref)) == 1
    assert [a.purpose for a in get_job_detail(job.id).attempt_log] == ["send", "status"]


def test_pgv2_tampered_response_signature_is_never_success(running: Stack):
    ref = payment(running, "pgv2", "40.00", "INR")
    running.sandbox.fault("pgv2", "refund", "bad_signature", times=1, payment_ref=ref)
    job = enqueue_refund(
        provider="pgv2",
        payment_ref=ref,
        amount="40.00",
        currency="INR",
        idempotency_key=unique("k"),
    )
    done = running.wait_status(job.id, FINAL)
    calls = get_job_detail(job.id).attempt_log
    assert (calls[0].outcome, calls[0].code) == ("ambiguous", "BAD_RESPONSE_SIGNATURE")
    # The refund was applied; the inquiry (properly signed) confirms it. One ledger entry.
    assert done.status == "succeeded"
    assert len(running.sandbox.ledger("pgv2", ref)) == 1


# ---- vaultspay ------------------------------------------------------------------------------


def test_vaultspay_refund_waits_for_the_gateway_then_succeeds_when_processed(running: Stack):
    ref = payment(running, "vaultspay", "120.00", "AED")
    job = enqueue_refund(
        provider="vaultspay",
        payment_ref=ref,
        amount="120.00",
        currency="AED",
        idempotency_key=unique("k"),
        original_amount="120.00",
    )
    waiting = running.wait_status(job.id, {"awaiting_gateway", *FINAL})
    assert waiting.status == "awaiting_gateway"
    assert waiting.provider_reference.startswith("RFRQ_")
    running.sandbox.post(
        f"/vaultspay/refund-requests/{waiting.provider_reference}/status", {"status": 2}
    )
    done = running.wait_status(job.id, FINAL)
    assert done.status == "succeeded"
    (entry,) = running.sandbox.ledger("vaultspay", ref)
    assert entry["reference"] == done.provider_reference


def test_vaultspay_partial_refund_sends_is_partial_1(running: Stack):
    ref = payment(running, "vaultspay", "120.00", "AED")
    job = enqueue_refund(
        provider="vaultspay",
        payment_ref=ref,
        amount="20.00",
        currency="AED",
        idempotency_key=unique("k"),
        original_amount="120.00",
    )
    waiting = running.wait_status(job.id, {"awaiting_gateway", *FINAL})
    request = running.sandbox.get(f"/vaultspay/refund-requests/{waiting.provider_reference}")
    assert (request["is_partial"], request["amount"]) == ("1", "20.00")


def test_vaultspay_partial_not_below_the_full_amount_is_declined(running: Stack):
    ref = payment(running, "vaultspay", "50.00", "AED")
    job = enqueue_refund(
        provider="vaultspay",
        payment_ref=ref,
        amount="50.00",
        currency="AED",
        idempotency_key=unique("k"),
        partial="1",
    )
    done = running.wait_status(job.id, FINAL)
    assert done.status == "declined"
    assert done.last_error.message == "The amount must be less than the transaction full amount."
    assert done.last_error.code == "422"


def test_vaultspay_apply_then_drop_is_unknown_because_it_cannot_be_asked(running: Stack):
    ref = payment(running, "vaultspay", "50.00", "AED")
    running.sandbox.fault("vaultspay", "create", "apply_then_drop", times=1, payment_ref=ref)
    job = enqueue_refund(
        provider="vaultspay",
        payment_ref=ref,
        amount="50.00",
        currency="AED",
        idempotency_key=unique("k"),
    )
    done = running.wait_status(job.id, FINAL)
    assert done.status == "unknown"
    assert len(running.sandbox.ledger("vaultspay", ref)) == 1
    assert len(running.sandbox.calls("vaultspay", "create", key=ref)) == 1


def test_vaultspay_token_expiring_mid_run_is_refreshed_without_failing_a_job(running: Stack):
    refs = [payment(running, "vaultspay", "30.00", "AED") for _ in range(2)]
    first = enqueue_refund(
        provider="vaultspay",
        payment_ref=refs[0],
        amount="30.00",
        currency="AED",
        idempotency_key=unique("k"),
    )
    assert running.wait_status(first.id, {"awaiting_gateway", *FINAL}).status == "awaiting_gateway"
    auth_before = len(running.sandbox.calls("vaultspay", "auth"))
    running.sandbox.post("/vaultspay/tokens/expire", {})

    second = enqueue_refund(
        provider="vaultspay",
        payment_ref=refs[1],
        amount="30.00",
        currency="AED",
        idempotency_key=unique("k"),
    )

    assert running.wait_status(second.id, {"awaiting_gateway", *FINAL}).status == "awaiting_gateway"
    assert len(running.sandbox.calls("vaultspay", "auth")) > auth_before
    assert get_job_detail(second.id).attempts == 1
    creates = running.sandbox.calls("vaultspay", "create", key=refs[1])
    assert [c["http_status"] for c in creates] in ([401, 200], [200])


# ---- every gateway: 503 then OK ------------------------------------------------------------


@pytest.mark.parametrize(
    ("gateway", "endpoint", "currency", "waiting_ok"),
    [
        ("bbmsl", "refund", "HKD", False),
        ("pgv2", "refund", "INR", False),
        ("vaultspay", "create", "AED", True),
    ],
)
def test_503_then_ok_retries_on_every_gateway(running, gateway, endpoint, currency, waiting_ok):
    ref = payment(running, gateway, "70.00", currency)
    running.sandbox.fault(gateway, endpoint, "error", status=503, times=1, payment_ref=ref)
    job = enqueue_refund(
        provider=gateway,
        payment_ref=ref,
        amount="70.00",
        currency=currency,
        idempotency_key=unique("k"),
    )
    done = running.wait_status(job.id, {"awaiting_gateway", *FINAL} if waiting_ok else FINAL)
    assert done.status == ("awaiting_gateway" if waiting_ok else "succeeded")
    assert done.attempts == 2
    assert len(running.sandbox.ledger(gateway, ref)) == 1


# ---- the CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gateway", "currency", "extra"),
    [("bbmsl", "HKD", []), ("vaultspay", "AED", ["--extra", "partial=0"]), ("pgv2", "INR", [])],
)
def test_cli_enqueues_to_each_gateway(running: Stack, gateway, currency, extra):
    ref = payment(running, gateway, "15.00", currency)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "enqueue",
            "refund",
            "--provider",
            gateway,
            "--payment-ref",
            ref,
            "--amount",
            "15.00",
            "--currency",
            currency,
            "--idempotency-key",
            unique("cli"),
            *extra,
        ],
        cwd=REPO,
        env=running.child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    done = running.wait_status(job_id, {"awaiting_gateway", *FINAL})
    assert done.status in ("succeeded", "awaiting_gateway")
    wait_for(lambda: running.sandbox.ledger(gateway, ref), timeout=10, message="ledger entry")
