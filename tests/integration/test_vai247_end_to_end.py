"""vai247 end to end: producer -> SQL -> real Redis -> real prefork worker -> HTTP -> sandbox.

Every test runs on SQLite and on PostgreSQL (the `running` stack is parametrised). Assertions
count from the sandbox's ledger (what the gateway really did) and from the database.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import pytest
from sqlalchemy import select

from tests.support.polling import wait_for
from tests.support.stack import Stack, unique
from worker.client import enqueue_cancel, enqueue_refund, get_job, get_job_detail
from worker.errors import IdempotencyConflict, OverRefund

FINAL = {"succeeded", "declined", "failed", "unknown"}


def order(stack: Stack, amount: str = "100.00", status: str = "completed") -> str:
    ref = unique("ord")
    stack.sandbox.create_payment("vai247", ref, amount, "USD", status=status)
    return ref


def test_a_vai247_refund_ends_succeeded_with_the_gateways_refund_id(running: Stack):
    ref = order(running)
    job = enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="50.00",
        currency="USD",
        idempotency_key=unique("key"),
        reason="Customer request",
    )
    assert job.status == "queued"

    done = running.wait_status(job.id, FINAL)

    ledger = running.sandbox.ledger("vai247", ref)
    assert done.status == "succeeded"
    assert done.raw_status == "processing"
    assert [e["amount"] for e in ledger] == ["50.00"]
    assert done.provider_reference == ledger[0]["reference"]
    assert done.provider_reference.startswith("ref_")
    assert done.attempts == 1


def test_cancel_of_a_pending_order_succeeds_and_of_a_completed_order_is_declined(running: Stack):
    pending = order(running, status="pending")
    completed = order(running, status="completed")
    ok = enqueue_cancel(provider="vai247", payment_ref=pending, idempotency_key=unique("c"))
    refused = enqueue_cancel(provider="vai247", payment_ref=completed, idempotency_key=unique("c"))

    ok = running.wait_status(ok.id, FINAL)
    refused = running.wait_status(refused.id, FINAL)

    assert ok.status == "succeeded"
    assert ok.raw_status == "cancelled"
    assert len(running.sandbox.ledger("vai247", pending)) == 1
    assert refused.status == "declined"
    assert refused.last_error.code == "ORDER_NOT_CANCELLABLE"
    assert "completed orders must be refunded" in refused.last_error.message
    assert running.sandbox.ledger("vai247", completed) == []


def test_fifty_concurrent_enqueues_of_one_key_make_one_job_and_one_refund(running: Stack):
    ref = order(running)
    key = unique("same-key")

    def enqueue(_: int) -> str:
        return enqueue_refund(
            provider="vai247",
            payment_ref=ref,
            amount="30.00",
            currency="USD",
            idempotency_key=key,
            original_amount="100.00",
        ).id

    with ThreadPoolExecutor(max_workers=25) as pool:
        ids = set(pool.map(enqueue, range(50)))

    assert len(ids) == 1
    job_id = ids.pop()
    assert running.wait_status(job_id, FINAL).status == "succeeded"
    assert len(running.sandbox.ledger("vai247", ref)) == 1
    with pytest.raises(IdempotencyConflict, match=key):
        enqueue_refund(
            provider="vai247",
            payment_ref=ref,
            amount="31.00",
            currency="USD",
            idempotency_key=key,
            original_amount="100.00",
        )
    # A replay of the original request still answers with the same (now final) job.
    again = enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="30.00",
        currency="USD",
        idempotency_key=key,
        original_amount="100.00",
    )
    assert (again.id, again.status) == (job_id, "succeeded")


def test_refunds_in_flight_count_against_the_original_amount(running: Stack):
    ref = order(running, amount="100.00")
    enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="60.00",
        currency="USD",
        idempotency_key=unique("k"),
        original_amount="100.00",
    )
    with pytest.raises(OverRefund, match=r"above the original 100\.00"):
        enqueue_refund(
            provider="vai247",
            payment_ref=ref,
            amount="40.01",
            currency="USD",
            idempotency_key=unique("k"),
        )
    fits = enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="40.00",
        currency="USD",
        idempotency_key=unique("k"),
    )
    assert running.wait_status(fits.id, FINAL).status == "succeeded"


def test_503_twice_then_ok_succeeds_on_the_third_attempt_after_backoff(running: Stack):
    ref = order(running)
    running.sandbox.fault("vai247", "refund", "error", status=503, times=2, payment_ref=ref)
    job = enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="10.00",
        currency="USD",
        idempotency_key=unique("k"),
    )

    done = running.wait_status(job.id, FINAL)

    assert done.status == "succeeded"
    assert done.attempts == 3
    calls = get_job_detail(job.id).attempt_log
    assert [c.outcome for c in calls] == ["not_sent", "not_sent", "succeeded"]
    assert [c.http_status for c in calls] == [503, 503, 200]
    for previous, following in pairwise(calls):
        # The next attempt started no sooner than the backoff the previous one scheduled.
        assert previous.retry_delay_seconds is not None and previous.retry_delay_seconds > 0
        gap = _at(following.started_at) - _at(previous.finished_at)
        assert gap.total_seconds() >= previous.retry_delay_seconds - 0.05
    assert len(running.sandbox.ledger("vai247", ref)) == 1


def test_apply_then_drop_ends_unknown_with_one_refund_and_is_never_resent(running: Stack):
    ref = order(running)
    running.sandbox.fault("vai247", "refund", "apply_then_drop", times=1, payment_ref=ref)
    job = enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="25.00",
        currency="USD",
        idempotency_key=unique("k"),
    )

    done = running.wait_status(job.id, FINAL)
    assert done.status == "unknown"
    assert done.last_error.code == "NO_RESPONSE"

    # Let the dispatcher and the reaper run several times; nothing may send it again.
    ticks_before = _beat_ticks(running)
    wait_for(
        lambda: _beat_ticks(running) >= ticks_before + 10, timeout=30, message="ten more beat ticks"
    )
    assert len(running.sandbox.calls("vai247", "refund", key=ref)) == 1
    assert len(running.sandbox.ledger("vai247", ref)) == 1
    assert get_job(job.id).status == "unknown"
    assert get_job(job.id).attempts == 1


def _beat_ticks(stack: Stack) -> int:
    beat = next(p for p in stack.processes if p.name == "beat")
    text = beat.log()
    return text.count("refundq.dispatch_queued") + text.count("refundq.reap_expired")


def _at(text: str | None) -> dt.datetime:
    assert text is not None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_job_rows_hold_only_the_job_id_in_broker_messages(running: Stack):
    """Rule 9: a task's arguments are the job id only (what Flower and Redis see)."""
    from worker.app import app

    ref = order(running)
    captured: list[dict] = []
    from celery.signals import before_task_publish

    def grab(sender=None, body=None, headers=None, **_):
        captured.append({"sender": sender, "body": body, "headers": headers})

    before_task_publish.connect(grab, weak=False)
    try:
        job = enqueue_refund(
            provider="vai247",
            payment_ref=ref,
            amount="5.00",
            currency="USD",
            idempotency_key=unique("k"),
            reason="Customer request",
        )
    finally:
        before_task_publish.disconnect(grab)
    assert app.conf.task_serializer == "json"
    (message,) = captured
    args, kwargs, _embed = message["body"]
    assert message["sender"] == "refundq.execute_job"
    assert (args, kwargs) == ([job.id], {})
    assert message["headers"]["argsrepr"] == repr([job.id])
    running.wait_status(job.id, FINAL)


def test_attempts_and_events_record_the_whole_story(running: Stack):
    ref = order(running)
    job = enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="7.00",
        currency="USD",
        idempotency_key=unique("k"),
    )
    running.wait_status(job.id, FINAL)
    from worker.db import read_session
    from worker.models import Event

    with read_session() as session:
        events = session.execute(
            select(Event.from_status, Event.to_status)
            .where(Event.job_id == job.id)
            .order_by(Event.id)
        ).all()
    assert [tuple(e) for e in events] == [
        (None, "queued"),
        ("queued", "submitting"),
        ("submitting", "succeeded"),
    ]
    (attempt,) = get_job_detail(job.id).attempt_log
    assert (attempt.purpose, attempt.state, attempt.outcome) == ("send", "done", "succeeded")
