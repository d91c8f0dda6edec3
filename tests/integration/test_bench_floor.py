"""The benchmarks' floor (bench/floor.py) does refundq's database work for a refund and no
less: a job it enqueues, claims and finishes leaves the rows refundq's own functions leave.

BENCHMARKS.md reads the floor's throughput as the most refundq can reach while it keeps its
statements; that reading holds only if the floor sends them all, with the job's own values.
PostgreSQL only (the floor's lock and statements are PostgreSQL's); a real database and the
sandbox over HTTP, no worker process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery.signals import celeryd_after_setup, setup_logging, worker_process_init
from sqlalchemy import select

import worker.app as refundq_app
from bench import turn
from tests.support.stack import unique
from worker.db import get_engine
from worker.models import Attempt, Event, Job

JOBS = Job.__table__  # type: ignore[attr-defined]
EVENTS = Event.__table__  # type: ignore[attr-defined]
ATTEMPTS = Attempt.__table__  # type: ignore[attr-defined]
# What differs between two jobs by construction: names, times, who held the lease.
OWN = {"id", "payment_ref", "idempotency_key", "fingerprint", "created_at", "updated_at",
       "next_attempt_at", "message_due_at", "finished_at", "lease_owner"}  # fmt: skip


def rows_of(job_id: str) -> dict[str, Any]:
    with get_engine().connect() as connection:
        job = connection.execute(select(JOBS).where(JOBS.c.id == job_id)).one()._mapping
        events = connection.execute(
            select(EVENTS.c.from_status, EVENTS.c.to_status, EVENTS.c.kind)
            .where(EVENTS.c.job_id == job_id)
            .order_by(EVENTS.c.id)
        ).all()
        attempts = connection.execute(
            select(
                ATTEMPTS.c.number,
                ATTEMPTS.c.purpose,
                ATTEMPTS.c.state,
                ATTEMPTS.c.outcome_class,
                ATTEMPTS.c.request_summary,
            ).where(ATTEMPTS.c.job_id == job_id)
        ).all()
    return {
        "job": {k: v for k, v in job.items() if k not in OWN},
        "events": [tuple(e) for e in events],
        "attempts": [tuple(a) for a in attempts],
    }


@pytest.fixture
def floor() -> Iterator[Any]:
    """bench.floor, imported here: like the baseline, it disconnects refundq's Celery signal
    receivers when imported (bench/baseline.py), and this process runs other tests after."""
    import bench.floor

    try:
        yield bench.floor
    finally:
        setup_logging.connect(refundq_app._logging)
        worker_process_init.connect(refundq_app._after_fork)
        celeryd_after_setup.connect(refundq_app._rehearse)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_floor_job_leaves_the_rows_a_refundq_job_leaves(stack_factory, floor):
    stack_factory()
    ours = "refundq-job"
    turn.enqueue(ours, unique("ord"), unique("k"))
    turn.succeed(*turn.claim(ours, "bench"))

    producer, worker = floor.Producer(), floor.Worker()
    floor_job = producer.enqueue(unique("ord"), unique("k"))
    worker.turn(floor_job, "ord-unknown-to-the-sandbox")

    expected, got = rows_of(ours), rows_of(floor_job)
    assert expected["job"]["status"] == "succeeded"
    assert [e[1] for e in expected["events"]] == ["queued", "submitting", "succeeded"]
    assert got == expected
    with get_engine().connect() as connection:  # what the bench reads its timings from
        times = connection.execute(
            select(JOBS.c.created_at, JOBS.c.finished_at).where(JOBS.c.id == floor_job)
        ).one()
    assert times.finished_at is not None and times.finished_at >= times.created_at
