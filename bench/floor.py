"""The floor: the bare-Celery baseline plus refundq's database work for a refund, and nothing
else (issue 7; BENCHMARKS.md, ninth round). PostgreSQL only.

Three commits a refund cannot do without: the job's, before it is published (a shop told
"queued" must never lose it); the claim's, before the gateway call (a worker that dies after
the call must leave a job known to be in doubt, not one that looks unsent); the outcome's.
The floor sends exactly the statements refundq sends for them, in the same transactions and
round trips, recorded from refundq's own functions (`bench.turn`) when each process starts and
sent again for every job by psycopg with only the job's values changed. Around them it has
what the baseline has and nothing of refundq's: no validation, no state machine, no
SQLAlchemy, no models, no structured logs, no beat. It does use refundq's Redis transport
(worker/broker.py), so that this saving counts for the floor as it does for refundq.

So the floor against the baseline bounds what refundq can reach on the same machine while it
keeps those statements: what is left between refundq and the floor is refundq's own Python.

    python -m bench.producer floor --n 5000 --prefix pay- --run r1
    celery -A bench.floor worker --pool prefork --concurrency 16
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from celery import Celery
from celery.signals import worker_process_init

from bench.baseline import bare_config, clients, post_refund

TASK = "bench.floor.refund"
TEMPLATE_PREFIX = "floor-template-"

app = Celery("bench-floor")
app.conf.update(bare_config(refundq_transport=True))


@dataclass(frozen=True)
class Statement:
    """One statement as refundq sent it: its SQL and the values it was sent with."""

    sql: str
    params: dict[str, Any]

    def values(self, now: datetime, **job: Any) -> dict[str, Any]:
        """The recorded values, every time in them `now`, and the job's own in place of the
        template's (each must be one refundq sends: a renamed parameter fails here, not by
        sending the template's value)."""
        unknown = set(job) - set(self.params)
        if unknown:
            raise KeyError(f"refundq no longer sends {sorted(unknown)}: {self.sql[:80]}")
        stamped = {k: now if isinstance(v, datetime) else v for k, v in self.params.items()}
        return stamped | job


@dataclass(frozen=True)
class Recorded:
    enqueue: tuple[Statement, ...]  # the lock, the key and live refunds, the job and its event
    claim: tuple[Statement, ...]  # the job's read, the claim with its event and attempt
    outcome: tuple[Statement, ...]  # the attempt, the job and its event


def record(owner: str) -> Recorded:
    """One template refund through refundq (`REFUNDQ_DATABASE_URL`), its statements kept."""
    from bench import turn
    from tests.support.statements import statements_sent
    from worker import db

    job_id = f"{TEMPLATE_PREFIX}{owner}"
    try:
        with statements_sent() as enqueue:
            turn.enqueue(job_id, job_id, job_id)
        with statements_sent() as claim:
            held, attempt_id = turn.claim(job_id, owner)
        with statements_sent() as outcome:
            turn.succeed(held, attempt_id)
    finally:
        db.dispose_all()
    recorded = Recorded(
        *(
            tuple(Statement(sent.raw, dict(sent.params or {})) for sent in step)
            for step in (enqueue, claim, outcome)
        )
    )
    shape = tuple(len(step) for step in (recorded.enqueue, recorded.claim, recorded.outcome))
    if shape != (3, 2, 1):
        raise RuntimeError(f"refundq's statements per step changed to {shape}; see bench/floor.py")
    return recorded


def payment_lock_key(provider: str, payment_ref: str) -> int:
    """The payment's advisory lock key, as `worker.jobs._lock_payment` derives it."""
    digest = hashlib.sha256(f"{provider}\x1f{payment_ref}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _connect(autocommit: bool) -> psycopg.Connection[Any]:
    from sqlalchemy.engine import make_url

    from worker.settings import get_settings

    url = make_url(get_settings().database_url).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=autocommit)


class Producer:
    """The enqueue's transaction, as refundq's producer sends it, then the publish."""

    def __init__(self) -> None:
        self.recorded = record(f"producer-{os.getpid()}")
        self.connection = _connect(autocommit=False)

    def enqueue(self, payment_ref: str, idempotency_key: str) -> str:
        job_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        lock, read, insert = self.recorded.enqueue
        cursor = self.connection.cursor()
        cursor.execute(lock.sql, {"b_key": payment_lock_key("vai247", payment_ref)})
        cursor.execute(
            read.sql, read.values(now, b_key=idempotency_key, b_payment_ref=payment_ref)
        ).fetchall()
        cursor.execute(
            insert.sql,
            insert.values(
                now, n_id=job_id, n_payment_ref=payment_ref, n_idempotency_key=idempotency_key
            ),
        )
        self.connection.commit()
        return job_id


class Worker:
    """The claim and the outcome around the gateway call, as a refundq worker sends them."""

    def __init__(self) -> None:
        self.owner = f"floor-{os.getpid()}"
        self.recorded = record(self.owner)
        self.connection = _connect(autocommit=True)
        self.read_columns: dict[str, int] = {}

    def turn(self, job_id: str, order_id: str) -> None:
        read, claim = self.recorded.claim
        (outcome,) = self.recorded.outcome
        cursor = self.connection.cursor()
        now = datetime.now(UTC)
        job = cursor.execute(read.sql, {"b_job_id": job_id}).fetchone()
        if job is None:
            raise RuntimeError(f"no job {job_id}")
        if not self.read_columns:
            self.read_columns = {c.name: i for i, c in enumerate(cursor.description or ())}
        claimed = cursor.execute(
            claim.sql,
            claim.values(
                now,
                b_job_id=job_id,
                b_owner=self.owner,
                b_seen_attempts=job[self.read_columns["attempt_count"]],
                b_seen_at=job[self.read_columns["updated_at"]],
                b_lease_until=now + timedelta(seconds=60),
                b_due_by=now + timedelta(seconds=1),
            ),
        ).fetchone()
        if claimed is None:
            raise RuntimeError(f"job {job_id} was not claimed")
        http, _results = clients()
        post_refund(http, order_id)
        moved = cursor.execute(
            outcome.sql,
            outcome.values(
                datetime.now(UTC),
                b_attempt_id=claimed[0],
                b_job_id=job_id,
                b_lease_owner=self.owner,
            ),
        ).fetchone()
        if moved is None:
            raise RuntimeError(f"job {job_id}: the outcome found it moved")


_worker: dict[int, Worker] = {}


@worker_process_init.connect
def _start(**_: Any) -> None:
    _worker[os.getpid()] = Worker()


# shared=False: a bench task must not join refundq's own app in a process that imports both.
@app.task(name=TASK, shared=False, acks_late=True, reject_on_worker_lost=True)
def refund(job_id: str, order_id: str) -> None:
    worker = _worker.get(os.getpid())
    if worker is None:  # a solo pool has no pool processes to initialise
        worker = _worker[os.getpid()] = Worker()
    worker.turn(job_id, order_id)
