"""A job's two writes on PostgreSQL (issue 7): the claim is one read and one statement, the
outcome one statement, each its own transaction (autocommit: no BEGIN and COMMIT round trips).
The state machine's promises hold as they do for SQLite's transactions: the claim's
compare-and-set, its event and its attempt commit together or not at all, a job changed between
the claim's read and its write is not claimed, and an outcome for a job that moved on still
finishes its attempt without writing an event. Real database; no worker runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, update

from tests.support.stack import Stack
from tests.support.statements import statements_sent
from worker import jobs
from worker.clock import utcnow
from worker.db import write_transaction
from worker.models import Attempt, Event, Job, JobStatus

DONE = jobs.Decision(
    JobStatus.SUCCEEDED,
    {
        "raw_status": "ok",
        "needs_status_check": False,
        "last_error_code": None,
        "last_error_message": None,
        "last_error_retryable": None,
    },
)


@pytest.fixture
def postgres_stack(request, tmp_path_factory) -> Iterator[Stack]:
    from tests.conftest import _stack_factory

    stacks: list[Stack] = []
    stack = _stack_factory("postgres", request, tmp_path_factory, stacks)()
    yield stack
    stack.deactivate()


def rows(model: Any, job_id: str) -> int:
    with write_transaction() as connection:
        return connection.execute(
            select(func.count()).select_from(model).where(model.job_id == job_id)
        ).scalar_one()


def first_send(_claim: jobs.Claim) -> tuple[str, dict[str, str]]:
    return "send", {"request": "refund"}


def finish(claim: jobs.Claim, attempt_id: int) -> jobs.Turn:
    return jobs.apply(
        claim,
        attempt_id,
        DONE,
        attempt_outcome="succeeded",
        http_status=200,
        code=None,
        message=None,
        duration_ms=1.5,
    )


def test_a_turn_is_three_autocommitted_statements(postgres_stack):
    job_id = postgres_stack.refund_new_order()

    with statements_sent() as statements:
        claimed = jobs.claim_job(job_id, "w1", 60, first_call=first_send)
        assert claimed is not None
        turn = finish(*claimed)

    assert turn.status is JobStatus.SUCCEEDED
    assert [s.autocommit for s in statements] == [True, True, True]
    read, claim, outcome = (s.sql for s in statements)
    assert read.startswith("select")
    assert claim.startswith("with claimed as (update jobs")
    assert "insert into events" in claim and "insert into attempts" in claim
    assert outcome.startswith("with finished as (update attempts")
    assert "update jobs" in outcome and "insert into events" in outcome
    assert rows(Event, job_id) == 3  # queued, submitting, succeeded
    assert rows(Attempt, job_id) == 1


def test_a_job_changed_after_the_claims_read_is_not_claimed_and_nothing_is_written(
    postgres_stack,
):
    job_id = postgres_stack.refund_new_order()

    def another_writer_moves_first(claim: jobs.Claim) -> tuple[str, dict[str, str]]:
        # Between the claim's read and its write, the job changes (another worker, an
        # operator): same status, so only the compare-and-set on updated_at can tell.
        with write_transaction() as connection:
            connection.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
        return first_send(claim)

    assert jobs.claim_job(job_id, "w1", 60, first_call=another_writer_moves_first) is None

    assert rows(Event, job_id) == 1  # queued only
    assert rows(Attempt, job_id) == 0
    claimed = jobs.claim_job(job_id, "w2", 60, first_call=first_send)
    assert claimed is not None and claimed[0].attempt_count == 1


def test_a_claim_without_its_first_call_writes_the_claim_and_its_event_only(postgres_stack):
    job_id = postgres_stack.refund_new_order()

    claimed = jobs.claim_job(job_id, "w1", 60, first_call=lambda _claim: None)

    assert claimed is not None and claimed[1] is None
    assert rows(Event, job_id) == 2
    assert rows(Attempt, job_id) == 0


def test_an_outcome_for_a_job_that_moved_on_finishes_the_attempt_and_writes_no_event(
    stack_factory,
):
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    claimed = jobs.claim_job(job_id, "w1", 60, first_call=first_send)
    assert claimed is not None
    claim, attempt_id = claimed
    assert attempt_id is not None
    with write_transaction() as connection:  # the reaper took the job (rule 5) meanwhile
        connection.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.UNKNOWN.value, lease_owner=None, updated_at=utcnow())
        )

    turn = finish(claim, attempt_id)

    assert turn.next is jobs.Next.LOST
    assert rows(Event, job_id) == 2  # queued, submitting: none for the outcome
    with write_transaction() as connection:
        attempt = connection.execute(select(Attempt).where(Attempt.id == attempt_id)).one()
        job = connection.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    assert (attempt.state, attempt.outcome_class, attempt.http_status) == ("done", "succeeded", 200)
    assert job == JobStatus.UNKNOWN.value
