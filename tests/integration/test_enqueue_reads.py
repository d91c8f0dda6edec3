"""The enqueue transaction reads the jobs table once for a refund: the job its idempotency key
already names and the payment's live refunds come back from one statement (one round trip on
PostgreSQL, issue 7), and the answers stay those of two separate reads. On PostgreSQL the job
and its first event are one statement too. SQLite and PostgreSQL;
no worker runs, so every job stays as it was enqueued unless a test moves it."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from tests.support.stack import Stack, unique
from tests.support.statements import statements_sent
from worker.client import enqueue_cancel, enqueue_refund
from worker.db import write_transaction
from worker.errors import IdempotencyConflict, OverRefund
from worker.models import Job


@pytest.fixture
def idle(stack_factory) -> Stack:
    stack: Stack = stack_factory()
    stack.broker().delete("refundq")
    return stack


def refund(ref: str, amount: str, key: str | None = None, **extra: str):
    return enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount=amount,
        currency="USD",
        idempotency_key=key or unique("k"),
        **extra,
    )


def set_status(job_id: str, status: str) -> None:
    with write_transaction() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(status=status))


def test_a_refund_reads_the_jobs_table_once_before_it_inserts(idle):
    ref = unique("ord")
    refund(ref, "10.00", original_amount="100.00")  # the payment has a live refund now

    with statements_sent() as sent:
        refund(ref, "20.00")

    seen = [s.sql for s in sent]
    reads = [sql for sql in seen if sql.startswith("select") and " from jobs" in sql]
    writes = [sql for sql in seen if "insert into" in sql]
    assert len(reads) == 1, seen
    if idle.backend == "postgres":
        # The payment's lock, the read, and the job with its event in one statement.
        assert len(seen) == 3, seen
        assert len(writes) == 1 and "insert into jobs" in writes[0], seen
        assert "insert into events" in writes[0]
    else:
        assert [sql.split()[2] for sql in writes] == ["jobs", "events"]


def test_live_refunds_count_and_ended_ones_do_not(idle):
    ref = unique("ord")
    first = refund(ref, "60.00", original_amount="100.00")
    enqueue_cancel(provider="vai247", payment_ref=ref, idempotency_key=unique("k"))

    with pytest.raises(OverRefund, match=r"already refunded or in flight: 60\.00 in 1 job"):
        refund(ref, "40.01")

    set_status(first.id, "declined")
    fits = refund(ref, "90.00", original_amount="100.00")
    assert fits.status == "queued"


def test_a_replay_is_answered_from_its_key_even_when_the_payment_is_fully_refunded(idle):
    ref = unique("ord")
    key = unique("k")
    first = refund(ref, "60.00", key, original_amount="100.00")
    refund(ref, "40.00")  # the payment's refunds now add up to its original amount

    again = refund(ref, "60.00", key, original_amount="100.00")

    assert again.id == first.id
    with pytest.raises(IdempotencyConflict):
        refund(ref, "61.00", key, original_amount="100.00")


def test_a_key_used_for_another_payment_is_a_conflict_not_a_refund_of_this_one(idle):
    key = unique("k")
    refund(unique("ord"), "10.00", key, original_amount="100.00")

    with pytest.raises(IdempotencyConflict):
        refund(unique("ord"), "10.00", key, original_amount="100.00")
