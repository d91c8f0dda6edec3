"""Notifications to shops: when a job that carries a `notify_url` reaches a final state or
`unknown`, refundq POSTs the job view there, signed, retried with backoff, every attempt
recorded. A notification never changes the job: it reads the job once, when it is recorded.

The phases follow the jobs' own (DESIGN.md rules 1-2): the `notifications` row commits first
(`record`, from `worker.engine.on_settled`) and its message is published after; a worker claims
it with a lease before it sends (`deliver`), so a duplicate or late message does nothing; the
outcome and the next due time commit together; and a beat sweep (`dispatch_due`) re-publishes
notifications whose message was lost. The task's one argument is the job id, like every
refundq task's: it delivers whatever of that job's notifications is due. Delivery is at least
once — a worker that dies after the shop answered sends it again — so shops deduplicate on
`Refundq-Notification-Id`.

Signature (docs/http-api.md shows the shop's side): header
`Refundq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, where the
secret is `REFUNDQ_NOTIFY_SECRET` and the body is the exact bytes sent. The timestamp is signed
with the body, so a shop can refuse old messages replayed at it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from worker.clock import utcnow
from worker.db import read_session, recheck, write_session
from worker.logs import get_logger
from worker.models import (
    FINAL_STATUSES,
    Event,
    Job,
    JobStatus,
    Notification,
    NotificationDelivery,
    NotificationState,
)
from worker.settings import Settings, get_settings
from worker.views import JobView

log = get_logger("refundq.notify")

NOTIFY_TASK = "refundq.notify"
DISPATCH_TASK = "refundq.dispatch_notifications"
SIGNATURE_HEADER = "Refundq-Signature"
NOTIFY_STATUSES = frozenset({*FINAL_STATUSES, JobStatus.UNKNOWN})

MINUTE = 60.0
HOUR = 3600.0
# Delays between deliveries of one notification, the last repeating: quick at first (a shop's
# endpoint that blipped), then spread out over most of a day for one that is down. With the
# default 8 attempts the last one goes out about 21 hours after the first.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (
    10.0,
    1 * MINUTE,
    5 * MINUTE,
    30 * MINUTE,
    2 * HOUR,
    6 * HOUR,
    12 * HOUR,
)
# A countdown message may arrive a hair before its due time (clock skew between hosts).
EARLY_TOLERANCE = timedelta(seconds=1)
# What a delivery keeps of a refusing endpoint's answer, for the operator.
ANSWER_EXCERPT_BYTES = 300

# Publishes `refundq.notify(job_id)`, after a countdown when one is given.
Publish = Callable[[str, float | None], None]


def retry_schedule(settings: Settings) -> Sequence[float]:
    return tuple(settings.notify_retry_schedule_seconds or DEFAULT_RETRY_SCHEDULE)


def retry_delay(schedule: Sequence[float], attempts_made: int) -> float:
    """The wait after the `attempts_made`-th failed delivery (1-based)."""
    return schedule[min(max(attempts_made, 1), len(schedule)) - 1]


def publish_notification(job_id: str, countdown: float | None = None) -> None:
    """Publish `refundq.notify(job_id)`: deliver the job's due notifications (after their rows
    committed). Like every refundq task it takes a job id only (DESIGN.md rule 9)."""
    from worker.app import QUEUE, app, published_now

    app.send_task(
        NOTIFY_TASK, args=[job_id], countdown=countdown, queue=QUEUE, headers=published_now()
    )


# ---------------------------------------------------------------------------------------------
# Record (worker.engine.on_settled)
# ---------------------------------------------------------------------------------------------


def record(job_id: str) -> int | None:
    """Record the notification for the job's current status, if the job wants one and it is
    not recorded yet. Returns its id when this call created it."""
    # Most jobs carry no notify_url: find that out without taking SQLite's write lock.
    with read_session() as session:
        wanted = session.execute(
            select(col(Job.notify_url)).where(col(Job.id) == job_id)
        ).scalar_one_or_none()
    if not wanted:
        return None
    now = utcnow()
    try:
        with write_session() as session:
            job = session.get(Job, job_id)
            if job is None or not job.notify_url or job.status not in NOTIFY_STATUSES:
                return None
            # The transition this notification reports: the latest event into this status.
            event_id = session.execute(
                select(func.max(col(Event.id))).where(
                    col(Event.job_id) == job_id, col(Event.to_status) == job.status
                )
            ).scalar_one_or_none()
            if event_id is None:
                return None
            seen = session.execute(
                select(col(Notification.id)).where(col(Notification.event_id) == event_id)
            ).scalar_one_or_none()
            if seen is not None:
                return None
            notification = Notification(
                job_id=job_id,
                event_id=event_id,
                job_status=job.status,
                url=job.notify_url,
                payload=JobView.of(job).model_dump_json(),
                state=NotificationState.PENDING.value,
                next_attempt_at=now,
                message_due_at=now,  # published right after the commit
                created_at=now,
                updated_at=now,
            )
            session.add(notification)
            session.flush()
            assert notification.id is not None
            return notification.id
    except IntegrityError:
        # Another on_settled for the same transition committed first (PostgreSQL; SQLite's
        # BEGIN IMMEDIATE serialises the two).
        return None


def notify_settled(job_id: str, *, publish: Publish = publish_notification) -> int | None:
    """Record the job's notification and publish it. A broker that is down is no reason to
    fail: the row is committed and the sweep publishes it later."""
    notification_id = record(job_id)
    if notification_id is None:
        return None
    try:
        publish(job_id, None)
    except Exception:
        log.warning(
            "notify.publish_failed",
            job_id=job_id,
            notification_id=notification_id,
            exc_info=True,
        )
    log.info("notify.recorded", job_id=job_id, notification_id=notification_id)
    return notification_id


# ---------------------------------------------------------------------------------------------
# Deliver (the `refundq.notify` task)
# ---------------------------------------------------------------------------------------------


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Refundq-Signature` header value for `body` sent at `timestamp`."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True)
class _Claimed:
    notification_id: int
    job_id: str
    url: str
    payload: str
    attempt: int
    owner: str


@dataclass(frozen=True)
class _Answer:
    outcome: str  # delivered | rejected | unreachable | not_sent
    started_at: datetime
    http_status: int | None
    error: str | None
    duration_ms: float | None


def deliver(job_id: str, *, publish: Publish, owner: str | None = None) -> str:
    """Deliver the job's due notifications, oldest first: claim each, POST it once, record what
    happened and when to try again (publishing that retry when it is short). Returns what
    happened, for the task log. Safe to run twice or late: only a claim sends."""
    settings = get_settings()
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    done: list[str] = []
    for notification_id in _due_for_job(job_id):
        claimed = _claim(notification_id, owner, settings)
        if claimed is None:
            continue
        answer = _post(claimed, settings)
        state, delay = _finish(claimed, answer, settings)
        log_method = log.info if answer.outcome == "delivered" else log.warning
        log_method(
            "notify.delivery",
            notification_id=notification_id,
            job_id=job_id,
            attempt=claimed.attempt,
            outcome=answer.outcome,
            http_status=answer.http_status,
            error=answer.error,
            state=state,
            retry_in=delay,
        )
        if delay is not None and delay <= settings.max_countdown_seconds:
            publish(job_id, delay)
        done.append(f"{notification_id}:{state}")
    return ", ".join(done) or "nothing due"


def _due_for_job(job_id: str) -> list[int]:
    with read_session() as session:
        return list(
            session.execute(
                select(col(Notification.id))
                .where(
                    col(Notification.job_id) == job_id,
                    col(Notification.state) == NotificationState.PENDING.value,
                    col(Notification.next_attempt_at) <= utcnow() + EARLY_TOLERANCE,
                )
                .order_by(col(Notification.id))
            ).scalars()
        )


def _claim(notification_id: int, owner: str, settings: Settings) -> _Claimed | None:
    now = utcnow()
    with write_session() as session:
        claimed = session.execute(
            update(Notification)
            .where(
                col(Notification.id) == notification_id,
                recheck(col(Notification.state), NotificationState.PENDING.value),
                or_(
                    col(Notification.next_attempt_at).is_(None),
                    col(Notification.next_attempt_at) <= now + EARLY_TOLERANCE,
                ),
                or_(
                    col(Notification.lease_expires_at).is_(None),
                    col(Notification.lease_expires_at) < now,
                ),
            )
            .values(
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                attempts=col(Notification.attempts) + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
            return None
        row = session.execute(
            select(
                col(Notification.job_id),
                col(Notification.url),
                col(Notification.payload),
                col(Notification.attempts),
            ).where(col(Notification.id) == notification_id)
        ).one()
    return _Claimed(notification_id, row.job_id, row.url, row.payload, row.attempts, owner)


def _post(claimed: _Claimed, settings: Settings) -> _Answer:
    if settings.notify_secret is None:
        return _Answer(
            "not_sent",
            utcnow(),
            None,
            "REFUNDQ_NOTIFY_SECRET is not set: refundq sends no unsigned notifications",
            None,
        )
    body = claimed.payload.encode("utf-8")
    secret = settings.notify_secret.get_secret_value().encode("utf-8")
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "refundq-notify/1",
        SIGNATURE_HEADER: sign(secret, int(time.time()), body),
        "Refundq-Notification-Id": str(claimed.notification_id),
        "Refundq-Job-Id": claimed.job_id,
        "Refundq-Delivery-Attempt": str(claimed.attempt),
    }
    started_at, started = utcnow(), time.perf_counter()
    try:
        # Streamed, so an endpoint that answers with megabytes costs us a few hundred bytes.
        with _client(settings).stream("POST", claimed.url, content=body, headers=headers) as reply:
            excerpt = b""
            if not reply.is_success:
                for chunk in reply.iter_bytes():
                    excerpt += chunk
                    if len(excerpt) >= ANSWER_EXCERPT_BYTES:
                        break
    except httpx.HTTPError as exc:
        elapsed = (time.perf_counter() - started) * 1000
        error = f"{type(exc).__name__}: {exc}"[:500]
        return _Answer("unreachable", started_at, None, error, elapsed)
    elapsed = (time.perf_counter() - started) * 1000
    if reply.is_success:
        return _Answer("delivered", started_at, reply.status_code, None, elapsed)
    text = excerpt[:ANSWER_EXCERPT_BYTES].decode("utf-8", errors="replace")
    message = f"HTTP {reply.status_code}" + (f": {text}" if text else "")
    return _Answer("rejected", started_at, reply.status_code, message, elapsed)


def _finish(claimed: _Claimed, answer: _Answer, settings: Settings) -> tuple[str, float | None]:
    now = utcnow()
    delay: float | None = None
    values: dict[str, object] = {
        "lease_owner": None,
        "lease_expires_at": None,
        "last_http_status": answer.http_status,
        "last_error": answer.error,
        "updated_at": now,
    }
    if answer.outcome == "delivered":
        state = NotificationState.DELIVERED
        values.update(delivered_at=now, next_attempt_at=None)
    elif claimed.attempt >= settings.notify_max_attempts:
        state = NotificationState.FAILED
        values.update(next_attempt_at=None)
    else:
        state = NotificationState.PENDING
        delay = retry_delay(retry_schedule(settings), claimed.attempt)
        due = now + timedelta(seconds=delay)
        values["next_attempt_at"] = due
        if delay <= settings.max_countdown_seconds:
            values["message_due_at"] = due  # the countdown message published below
    values["state"] = state.value
    with write_session() as session:
        session.add(
            NotificationDelivery(
                notification_id=claimed.notification_id,
                number=claimed.attempt,
                started_at=answer.started_at,
                duration_ms=answer.duration_ms,
                http_status=answer.http_status,
                outcome=answer.outcome,
                error=answer.error,
            )
        )
        moved = session.execute(
            update(Notification)
            .where(
                col(Notification.id) == claimed.notification_id,
                col(Notification.lease_owner) == claimed.owner,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    if moved.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
        # Our lease ran out mid-delivery and another worker claimed it: the attempt is on
        # record, the state is the other worker's to write.
        return "lease lost", None
    return state.value, delay


_client_lock = threading.Lock()
_clients: dict[str, object] = {}


def _client(settings: Settings) -> httpx.Client:
    """One HTTP client per process (never inherited across fork), redirects not followed: a
    notification goes to the URL the shop gave, nowhere else."""
    with _client_lock:
        if _clients.get("pid") != os.getpid():
            _clients.clear()
            _clients["pid"] = os.getpid()
        client = _clients.get("client")
        if not isinstance(client, httpx.Client):
            timeout = min(settings.notify_timeout_seconds, settings.task_time_limit_seconds / 2)
            client = httpx.Client(
                timeout=httpx.Timeout(
                    timeout, connect=min(timeout, settings.http_connect_timeout_seconds)
                ),
                follow_redirects=False,
                limits=httpx.Limits(max_keepalive_connections=10, keepalive_expiry=2.0),
            )
            _clients["client"] = client
        return client


# ---------------------------------------------------------------------------------------------
# The sweep (beat): notifications whose message was lost, or whose wait was too long for a
# countdown, or whose worker died mid-delivery (expired lease).
# ---------------------------------------------------------------------------------------------


def _due_conditions(now: datetime, stale: datetime) -> tuple[ColumnElement[bool], ...]:
    return (
        col(Notification.state) == NotificationState.PENDING.value,
        col(Notification.next_attempt_at) <= now,
        or_(col(Notification.message_due_at).is_(None), col(Notification.message_due_at) <= stale),
        or_(
            col(Notification.lease_expires_at).is_(None),
            col(Notification.lease_expires_at) < now,
        ),
    )


def due_notifications(now: datetime, stale: datetime, limit: int) -> list[int]:
    """Pending notifications due by `now` whose last message was due at `stale` or before."""
    with read_session() as session:
        return list(
            session.execute(
                select(col(Notification.id))
                .where(*_due_conditions(now, stale))
                .order_by(col(Notification.next_attempt_at))
                .limit(limit)
            ).scalars()
        )


def dispatch_due(*, publish: Publish, limit: int | None = None) -> int:
    """Publish the notifications that are due and whose last message should have run by now.
    Two sweeps at once publish each one once: the `message_due_at` update is a compare-and-set."""
    settings = get_settings()
    now = utcnow()
    stale = now - timedelta(seconds=settings.redispatch_after_seconds)
    conditions = _due_conditions(now, stale)
    due = due_notifications(now, stale, limit or settings.dispatch_batch_size)
    if not due:
        return 0
    with write_session() as session:
        mine = session.execute(
            update(Notification)
            .where(col(Notification.id).in_(due), *conditions)
            .values(message_due_at=now)
            .returning(col(Notification.id), col(Notification.job_id))
        ).all()
    # One message per job delivers all of its due notifications.
    for job_id in dict.fromkeys(row.job_id for row in mine):
        publish(job_id, None)
    if mine:
        log.info("notify.dispatched", count=len(mine))
    return len(mine)
