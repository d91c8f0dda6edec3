"""A prefork worker's parent rehearses a job's turn and beat's reads before it forks its pool,
so that every pool process starts with their SQL already compiled.

SQLAlchemy compiles a statement the first time a process runs it and caches the result in the
engine. Pool processes that each start with an empty cache paid for it inside their first job
and on their first beat tick: 27-42 ms a statement set, a cluster of slow jobs after every
worker start and every recycled pool process (issue 7, BENCHMARKS.md "The paced tail"). The
parent compiles them once; the engine and its cache cross `fork`, its connections do not
(`worker.db.reset_after_fork`). Nothing the rehearsal writes is kept: it runs in one
transaction that is rolled back (`worker.db.rehearsal`), and it calls no gateway and publishes
nothing.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from providers.base import Capabilities, GatewayResult, Kind, Outcome
from worker import db, jobs, notify
from worker.clock import utcnow
from worker.logs import get_logger

log = get_logger("refundq.warmup")

# A provider id no configuration names, so the rehearsal's job could never be taken for real.
REHEARSAL_PROVIDER = "rehearsal"


def rehearse() -> bool:
    """Run a refund's enqueue, claim and outcome, and each beat sweep's read, then roll them
    back. False (and a warning) if the database could not be reached: the worker starts anyway
    and its processes compile as they go."""
    started = time.perf_counter()
    try:
        with db.rehearsal():
            _turn()
            _beat_reads()
    except (SQLAlchemyError, OSError, RehearsalFailed) as exc:
        log.warning("warmup.skipped", error=f"{type(exc).__name__}: {exc}")
        return False
    log.info("warmup.done", duration_ms=round((time.perf_counter() - started) * 1000, 1))
    return True


class RehearsalFailed(RuntimeError):
    """The rehearsal did not go as a real turn would (a bug, or a database out of step)."""


def _turn() -> None:
    job_id = f"rehearsal-{uuid.uuid4().hex[:16]}"
    job, _ = jobs.insert_job(
        jobs.NewJob(
            kind=Kind.REFUND,
            provider=REHEARSAL_PROVIDER,
            payment_ref=job_id,
            currency="USD",
            amount_minor=100,
            original_amount_minor=100,
            reason=None,
            extras={},
            idempotency_key=job_id,
        ),
        job_id,
    )
    claimed = jobs.claim_job(job.id, "rehearsal", 60, first_call=lambda _claim: ("send", {}))
    if claimed is None:
        raise RehearsalFailed("its job was not claimed")
    claim, attempt_id = claimed
    if attempt_id is None:
        raise RehearsalFailed("its claim recorded no attempt")
    answer = GatewayResult(Outcome.SUCCEEDED, provider_reference="rehearsal", raw_status="ok")
    capabilities = Capabilities(kinds=frozenset(Kind), status_query=False, resend_safe=False)
    jobs.apply(
        claim,
        attempt_id,
        jobs.decide_result(claim, capabilities, answer, (60.0,), 3600.0),
        attempt_outcome="succeeded",
        http_status=200,
        code=None,
        message=None,
        duration_ms=0.0,
    )


def _beat_reads() -> None:
    """What each beat sweep reads when nothing is due (most ticks)."""
    now = utcnow()
    stale = now - timedelta(minutes=1)
    jobs.due_for_dispatch(now, stale, 1)
    jobs.expired_leases(now, 1)
    jobs.due_polls(now, 1)
    notify.due_notifications(now, stale, 1)
