"""Celery tasks, thin on purpose: each takes a job id (or nothing), calls into `worker.engine`,
and returns. Each can run twice, late, or after a crash and do the right thing, because the
database claims decide, not the messages (DESIGN.md rules 1-2).

Arguments are job ids only: Flower and the broker never see credentials or customer data.
"""

from __future__ import annotations

import dataclasses

from worker import db, engine
from worker.app import (
    EXECUTE_JOB,
    POLL_JOB,
    app,
    oldest_waiting_published_at,
    publish_job,
    publish_poll,
)


@app.task(name=EXECUTE_JOB, acks_late=True, reject_on_worker_lost=True)
def execute_job(job_id: str) -> str:
    """Claim the job and make its next gateway call."""
    return engine.execute_job(job_id, publish=publish_job)


@app.task(name="refundq.dispatch_queued")
def dispatch_queued() -> int:
    """Re-publish jobs whose time has come and whose message may be lost."""
    return engine.dispatch_queued(publish=publish_job, waiting_since=oldest_waiting_published_at)


@app.task(name="refundq.checkpoint")
def checkpoint() -> dict[str, int] | None:
    """Copy SQLite's write-ahead log into the database, off the jobs' path (worker/db.py)."""
    done = db.checkpoint()
    return None if done is None else dataclasses.asdict(done)


@app.task(name="refundq.reap_expired")
def reap_expired() -> dict[str, int]:
    """Resolve jobs whose worker died mid-turn (expired lease), by rule 5."""
    return engine.reap_expired(publish=publish_job)


@app.task(name="refundq.poll_pending")
def poll_pending() -> dict[str, int]:
    """Claim the awaiting jobs whose poll time has come and publish one poll for each."""
    return engine.poll_pending(publish_poll=publish_poll)


@app.task(name=POLL_JOB, acks_late=True)
def poll_job(job_id: str) -> str:
    """Ask the gateway where an awaiting refund stands."""
    return engine.poll_job(job_id)


@app.task(name="refundq.reconcile")
def reconcile() -> dict[str, int]:
    """Daily: compare jobs with the gateways; the report goes to the log (and to
    REFUNDQ_REPORTS_DIR when set)."""
    return engine.reconcile_daily()


# ---- notifications to shops (HTTP API, issue 5) ----------------------------------------------


@app.task(name="refundq.notify", acks_late=True)
def notify(job_id: str) -> str:
    """POST the job's due notifications to its shop (worker/notify.py); a retry, if any, is
    published as a countdown here or left to the sweep."""
    from worker import notify as notifications

    return notifications.deliver(job_id, publish=notifications.publish_notification)


@app.task(name="refundq.dispatch_notifications")
def dispatch_notifications() -> int:
    """Re-publish notifications that are due and whose message may be lost."""
    from worker import notify as notifications

    return notifications.dispatch_due(publish=notifications.publish_notification)
