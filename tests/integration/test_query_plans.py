"""A statement that names its job by primary key finds it by primary key (issue 7).

The compare-and-set statements of a job's turn say "this job, if it is still queued" (or
`submitting`, or awaiting). With a plain `status = …`, PostgreSQL's planner could serve that
from an index that leads with the status whenever its statistics call the status rare, as
`submitting` and `queued` are once most jobs are finished, and then walk every in-flight job,
and every dead index entry a moved job left, to find the one row: 233 buffers read to find
an outcome's job instead of 4 in `bench writes` (BENCHMARKS.md, eighth round). `worker.db.recheck`
writes those checks so no index can serve them.

Here the database holds thousands of finished jobs and one of each state under test, its
statistics are fresh (`ANALYZE`), and every statement a turn sends that names a job by its id
is explained with the values it was sent: the jobs table must be read through its primary
key, on SQLite and on PostgreSQL, with the custom plan and with the generic one a prepared
statement switches to. Real databases; no worker runs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, text, update

from tests.support.stack import Stack
from tests.support.statements import Sent, statements_sent
from tests.support.turns import a_successful_turn
from worker import jobs
from worker.clock import utcnow
from worker.db import get_engine, write_transaction
from worker.models import Job, JobStatus

JOBS = Job.__table__  # type: ignore[attr-defined]
FINISHED = 3000


def fill_with_finished_jobs(template_id: str) -> None:
    """FINISHED copies of a job, succeeded, so that the live statuses are rare."""
    with write_transaction() as connection:
        row = dict(connection.execute(select(JOBS).where(JOBS.c.id == template_id)).one()._mapping)
        copies = [
            row
            | {
                "id": f"done-{n}",
                "idempotency_key": f"done-key-{n}",
                "payment_ref": f"done-ord-{n}",
                "status": JobStatus.SUCCEEDED.value,
                "finished_at": row["created_at"],
            }
            for n in range(FINISHED)
        ]
        connection.execute(insert(JOBS), copies)
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE"))


def by_job_id(sent: list[Sent]) -> list[Sent]:
    """The statements that read or write the jobs table naming one job by its id."""
    found = [s for s in sent if "jobs.id = " in s.sql and not s.sql.startswith("insert")]
    assert found, sent
    return found


def jobs_access(statement: Sent, *, generic: bool = False) -> list[str]:
    """How the database reads the jobs table for `statement`: one line per access."""
    engine = get_engine()
    raw = engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        if engine.dialect.name == "sqlite":
            rows = driver.execute("EXPLAIN QUERY PLAN " + statement.raw).fetchall()
            return [row[3] for row in rows if " jobs " in f" {row[3]} "]
        with driver.cursor() as cursor:
            if generic:
                cursor.execute("SET plan_cache_mode = force_generic_plan")
            cursor.execute("EXPLAIN " + statement.raw, statement.params)
            plan = [row[0] for row in cursor.fetchall()]
            cursor.execute("RESET plan_cache_mode")
        driver.rollback()
        return [line.strip(" ->") for line in plan if "Scan" in line and " on jobs" in line]
    finally:
        raw.close()


def assert_by_primary_key(statement: Sent, backend: str) -> None:
    plans = {"custom": jobs_access(statement)}
    if backend == "postgres":
        plans["generic"] = jobs_access(statement, generic=True)
    for kind, access in plans.items():
        assert access, (kind, statement.sql)
        for line in access:
            if backend == "postgres":
                assert "using jobs_pkey on jobs" in line, (kind, line, statement.sql)
            else:
                assert "(id=?)" in line, (kind, line, statement.sql)


@pytest.fixture
def stack(stack_factory) -> Iterator[Stack]:
    yield stack_factory()


def test_a_turns_statements_find_the_job_by_its_primary_key(stack):
    job_id = stack.refund_new_order()
    fill_with_finished_jobs(job_id)
    a_successful_turn(stack.refund_new_order())  # the statements compiled and prepared

    with statements_sent() as sent:
        turn = a_successful_turn(job_id)

    assert turn.status is JobStatus.SUCCEEDED
    statements = by_job_id(sent)
    assert any(s.sql.startswith(("update", "with")) for s in statements), statements
    for statement in statements:
        assert_by_primary_key(statement, stack.backend)


def test_a_poll_claim_finds_the_job_by_its_primary_key(stack):
    job_id = stack.refund_new_order()
    fill_with_finished_jobs(job_id)
    with write_transaction() as connection:
        connection.execute(
            update(JOBS)
            .where(JOBS.c.id == job_id)
            .values(
                status=JobStatus.AWAITING_GATEWAY.value,
                next_poll_at=utcnow() - timedelta(seconds=1),
                poll_deadline_at=utcnow() + timedelta(hours=1),
            )
        )

    with statements_sent() as sent:
        claimed = jobs.claim_poll(job_id, (60.0,), actor="test")

    assert claimed is jobs.PollClaim.POLL
    statements = by_job_id(sent)
    assert any(s.sql.startswith("update") for s in statements), statements
    for statement in statements:
        assert_by_primary_key(statement, stack.backend)
