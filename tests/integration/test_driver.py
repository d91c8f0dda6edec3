"""The hot path's statements run on the driver (worker/driver.py, issue 7): a job's claim and
outcome reach sqlite3 or psycopg without SQLAlchemy's per-statement machinery, and what they
return, raise and commit is what SQLAlchemy would have. Real databases, SQLite and
PostgreSQL; no worker runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, IntegrityError

from tests.support.stack import Stack, unique
from tests.support.statements import statements_sent
from tests.support.turns import a_successful_turn
from worker import driver, jobs
from worker.clock import utcnow
from worker.db import get_engine, read_session, single_statements, write_transaction
from worker.models import Attempt, Event, Job

JOBS, EVENTS = Job.__table__, Event.__table__  # type: ignore[attr-defined]


@contextmanager
def through_sqlalchemy() -> Iterator[list[str]]:
    """The statements SQLAlchemy's `Connection.execute` sends while the block runs."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(" ".join(statement.split()[:3]).lower())

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_jobs_turn_bypasses_sqlalchemys_execute(stack_factory):
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    a_successful_turn(stack.refund_new_order())  # compiled once, outside the block

    with through_sqlalchemy() as sent, statements_sent() as received:
        turn = a_successful_turn(job_id)

    assert turn.status is jobs.JobStatus.SUCCEEDED
    assert sent == []
    # ... and yet the database received the turn's statements, from the driver.
    if stack.backend == "postgres":  # the claim's read and its statement, the outcome's
        assert len(received) == 3, received
        assert all(statement.autocommit for statement in received)
    else:
        assert len(received) >= 3, received
    with read_session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "succeeded" and job.lease_owner is None
        events = session.execute(
            select(Event.to_status).where(Event.job_id == job_id).order_by(Event.id)
        ).scalars()
        assert list(events) == ["queued", "submitting", "succeeded"]


# A read of every type the jobs table holds (text, integers, JSON, datetimes, booleans).
_JOB_ROW = select(JOBS).where(JOBS.c.id == bindparam("b_id"))


def test_rows_come_back_as_sqlalchemy_returns_them(stack_factory):
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()

    with write_transaction() as connection:
        ours = driver.execute(connection, _JOB_ROW, {"b_id": job_id}).first()
        theirs = connection.execute(_JOB_ROW, {"b_id": job_id}).first()
        assert driver.execute(connection, _JOB_ROW, {"b_id": "no-such-job"}).first() is None
        assert driver.execute(connection, _JOB_ROW, {"b_id": "no-such-job"}).all() == []
        missing = driver.execute(connection, _JOB_ROW, {"b_id": "no-such-job"})
        assert missing.scalar_one_or_none() is None

    assert ours is not None and theirs is not None
    assert ours._fields == theirs._fields
    assert tuple(ours) == tuple(theirs)
    assert [type(value) for value in ours] == [type(value) for value in theirs]
    assert ours.created_at == theirs.created_at and ours.extras == theirs.extras


def test_values_are_stored_as_sqlalchemy_stores_them(stack_factory):
    """Each type's bind processor runs, for None too (a JSON column stores JSON 'null')."""
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    row = {
        "job_id": job_id,
        "at": utcnow(),
        "kind": "note",
        "actor": "test",
        "to_status": None,
        "from_status": None,
        "note": None,
        "detail": None,
    }
    with write_transaction() as connection:
        driver.execute(connection, jobs._INSERT_EVENT, row | {"actor": "driver"})
        connection.execute(jobs._INSERT_EVENT, row | {"actor": "sqlalchemy"})
        stored = connection.execute(
            text(
                "SELECT actor, CAST(at AS TEXT), CAST(detail AS TEXT) FROM events"
                " WHERE job_id = :job_id AND kind = 'note'"
            ),
            {"job_id": job_id},
        ).all()
    by_actor = {actor: rest for actor, *rest in stored}
    assert by_actor["driver"][1] == by_actor["sqlalchemy"][1]
    assert len(by_actor["driver"][0]) == len(by_actor["sqlalchemy"][0])  # same format


def test_a_constraint_violation_raises_sqlalchemys_integrity_error(stack_factory):
    """`insert_job` relies on it: a concurrent producer's key shows as `IntegrityError`."""
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    with read_session() as session:
        taken = session.execute(select(Event.id).where(Event.job_id == job_id)).scalars().first()
    row = {
        "id": taken,
        "job_id": job_id,
        "at": utcnow(),
        "kind": "transition",
        "actor": "test",
        "to_status": "queued",
        "from_status": None,
        "note": None,
        "detail": None,
    }
    with pytest.raises(IntegrityError), write_transaction() as connection:
        driver.execute(connection, jobs._INSERT_EVENT, row)


def test_a_driver_write_is_rolled_back_with_its_transaction(stack_factory):
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    note = unique("note")

    with pytest.raises(RuntimeError), write_transaction() as connection:
        jobs.record_event(connection, job_id, kind="note", actor="test", note=note)
        raise RuntimeError("the transaction fails after the write")
    with write_transaction() as connection:
        jobs.record_event(connection, job_id, kind="note", actor="test", note=note + "-kept")

    with read_session() as session:
        notes = session.execute(select(Event.note).where(Event.job_id == job_id)).scalars()
        assert [n for n in notes if n and n.startswith(note)] == [note + "-kept"]


def test_what_needs_an_execution_context_still_gets_one(stack_factory):
    """A Python-side column default and an IN list SQLAlchemy expands per execution: both
    run through SQLAlchemy, with the right answer."""
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    table = Table(
        unique("t"),
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("label", String(20), default=lambda: "from-python"),
    )
    table.create(get_engine())
    try:
        add = insert(table)
        in_list = select(JOBS.c.id).where(JOBS.c.status.in_(["queued", "retry_wait"]))
        with write_transaction() as connection:
            added = driver.execute(connection, add, {"id": 1})
            found = driver.execute(connection, in_list, {}).all()
            label = connection.execute(select(table.c.label)).scalar_one()
        assert isinstance(added, CursorResult)
        assert label == "from-python"
        assert job_id in [row.id for row in found]
    finally:
        table.drop(get_engine())


def test_a_plan_is_compiled_once_per_statement_and_parameter_names(stack_factory):
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    statement = select(JOBS.c.status).where(JOBS.c.id == bindparam("b_id"))  # new to the cache
    with write_transaction() as connection:
        before = driver.plan_count()
        for _ in range(3):
            driver.execute(connection, statement, {"b_id": job_id})
        once = driver.plan_count()
        driver.execute(connection, statement, {"b_id": job_id, "unused": 1})
        twice = driver.plan_count()
    assert (once - before, twice - once) == (1, 1)


def test_a_second_claim_while_the_lease_holds_gets_nothing_and_writes_nothing(stack_factory):
    """A duplicate message: the claim's compare-and-set, on the driver on SQLite, refuses it."""
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    first = jobs.claim_job(job_id, "w1", 60, first_call=lambda _claim: ("send", {"a": "1"}))
    assert first is not None and first[1] is not None

    def written() -> tuple[int, int]:
        with read_session() as session:
            events = session.execute(select(Event.id).where(Event.job_id == job_id)).all()
            attempts = session.execute(select(Attempt.id).where(Attempt.job_id == job_id)).all()
        return len(events), len(attempts)

    before = written()
    second = jobs.claim_job(job_id, "w2", 60, first_call=lambda _claim: ("send", {"a": "1"}))

    assert second is None
    assert written() == before == (2, 1)  # queued, submitting; the first claim's attempt
    with read_session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.lease_owner, job.attempt_count) == ("submitting", "w1", 1)


_BACKEND_PID = select(func.pg_backend_pid())


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_connection_the_server_dropped_is_invalidated_not_reused(stack_factory, backend):
    """As for SQLAlchemy's own statements: a driver error that means the server is gone
    invalidates the connection, so the pool does not hand it out again."""
    stack_factory()
    with single_statements() as connection:
        pid = driver.execute(connection, _BACKEND_PID, {}).scalar_one_or_none()
        with get_engine().connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as raised:
            driver.execute(connection, _BACKEND_PID, {})
    assert raised.value.connection_invalidated
    with single_statements() as connection:  # a new connection, to a new server process
        assert driver.execute(connection, _BACKEND_PID, {}).scalar_one_or_none() not in (pid, None)


def test_an_engine_that_echoes_gets_every_statement_through_sqlalchemy(stack_factory):
    """`echo` logs each statement SQLAlchemy runs; the driver steps aside so none is missing."""
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    echoing = create_engine(get_engine().url, echo=True)
    try:
        with echoing.begin() as connection:
            result = driver.execute(connection, _JOB_ROW, {"b_id": job_id})
            assert isinstance(result, CursorResult)
            assert result.first() is not None
    finally:
        echoing.dispose()
