"""The tables: jobs (the source of truth), attempts (one row per gateway call), events (one
row per status change), and the shops' notifications with their deliveries. Only `worker.jobs`
writes `Job.status`.

Money is stored as integers in the currency's minor unit (`amount_minor`), so sums in SQL are
exact on SQLite (which has no decimal type) and PostgreSQL alike.
Timestamps are aware UTC (`worker.clock.utcnow`); SQLModel stores them as UTC on both databases.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, String, Text, text
from sqlmodel import Field, SQLModel


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    SUBMITTING = "submitting"
    RETRY_WAIT = "retry_wait"
    AWAITING_GATEWAY = "awaiting_gateway"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    FAILED = "failed"
    UNKNOWN = "unknown"


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.DECLINED, JobStatus.FAILED})
# A job in one of these may still move money: it counts against the payment's original amount.
LIVE_STATUSES = frozenset(set(JobStatus) - {JobStatus.DECLINED, JobStatus.FAILED})


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        # dispatch_queued: queued/retry_wait jobs whose time has come.
        Index("ix_jobs_status_next_attempt", "status", "next_attempt_at"),
        # reap_expired: submitting jobs whose lease ran out.
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        # poll_pending: only awaiting jobs carry a poll time, so the index holds only them and a
        # tick costs what is due, not what is waiting (issue 4).
        Index(
            "ix_jobs_next_poll_due",
            "next_poll_at",
            sqlite_where=text("next_poll_at IS NOT NULL"),
            postgresql_where=text("next_poll_at IS NOT NULL"),
        ),
        # the over-refund check sums a payment's live jobs.
        Index("ix_jobs_payment", "provider", "payment_ref"),
        Index("ix_jobs_created", "created_at"),
        # `/metrics` counts jobs by status and provider and finds the oldest job of each
        # unfinished status at every scrape: an index-only scan instead of the wide rows.
        Index("ix_jobs_status_provider_created", "status", "provider", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(max_length=16)
    provider: str = Field(max_length=32)
    payment_ref: str = Field(max_length=128)
    amount_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    original_amount_minor: int | None = Field(
        default=None, sa_column=Column(BigInteger, nullable=True)
    )
    currency: str | None = Field(default=None, max_length=3)
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    extras: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    notify_url: str | None = Field(default=None, sa_column=Column(Text, nullable=True))

    idempotency_key: str = Field(sa_column=Column(String(255), nullable=False, unique=True))
    fingerprint: str = Field(max_length=64)

    status: str = Field(max_length=20)
    attempt_count: int = 0
    next_attempt_at: datetime | None = None
    # When the last message published for this job was due to run (see jobs.due_for_dispatch).
    message_due_at: datetime | None = None
    lease_owner: str | None = Field(default=None, max_length=200)
    lease_expires_at: datetime | None = None
    # A send may have reached the gateway and its answer was lost: before anything else is sent
    # the gateway is asked (rule 5). `ambiguous_sends` counts such sends, for ops and chaos.
    needs_status_check: bool = False
    ambiguous_sends: int = 0

    next_poll_at: datetime | None = None
    poll_count: int = 0
    poll_deadline_at: datetime | None = None

    provider_reference: str | None = Field(default=None, max_length=128)
    raw_status: str | None = Field(default=None, max_length=64)
    last_error_code: str | None = Field(default=None, max_length=64)
    last_error_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    last_error_retryable: bool | None = None

    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


class Attempt(SQLModel, table=True):
    """One gateway call. Written as `sending` before the call, completed after it."""

    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    number: int
    purpose: str = Field(max_length=16)  # "send" | "status"
    state: str = Field(max_length=16)  # "sending" | "done" | "abandoned"
    lease_owner: str | None = Field(default=None, max_length=200)
    started_at: datetime
    finished_at: datetime | None = None
    duration_ms: float | None = None
    request_summary: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    http_status: int | None = None
    outcome_class: str | None = Field(default=None, max_length=32)
    code: str | None = Field(default=None, max_length=64)
    message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    retry_delay_seconds: float | None = None


class Event(SQLModel, table=True):
    """One status change (or an operator's or callback's note) of one job."""

    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    at: datetime
    from_status: str | None = Field(default=None, max_length=20)
    to_status: str | None = Field(default=None, max_length=20)
    kind: str = Field(max_length=32)  # "transition" | "callback" | "reconciled" | "note"
    actor: str = Field(max_length=200)
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


# ---- HTTP API: notifications to shops, and the index the metrics read (issue 5) -------------


class NotificationState(enum.StrEnum):
    PENDING = "pending"  # due at `next_attempt_at`
    DELIVERED = "delivered"  # the shop answered 2xx
    FAILED = "failed"  # every attempt was used up; the job itself is unaffected


class Notification(SQLModel, table=True):
    """One notice to a shop's `notify_url` that its job reached a final state or `unknown`.

    At most one per status change: `event_id` is the `events` row of the transition it reports,
    so `worker.engine.on_settled` may run twice for one transition and a job re-driven to the
    same status later is reported again. `payload` is the job view at that moment, the exact
    body every attempt sends.
    """

    __tablename__ = "notifications"
    __table_args__ = (
        # The sweep (pending and due) and the metrics (count by state) read this index only.
        Index("ix_notifications_state_due", "state", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    event_id: int = Field(foreign_key="events.id", unique=True)
    job_status: str = Field(max_length=20)
    url: str = Field(sa_column=Column(Text, nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    state: str = Field(max_length=16)
    attempts: int = 0
    next_attempt_at: datetime | None = None
    # When the last message published for it was due (the sweep's yardstick, as for jobs).
    message_due_at: datetime | None = None
    lease_owner: str | None = Field(default=None, max_length=200)
    lease_expires_at: datetime | None = None
    last_http_status: int | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None = None


class NotificationDelivery(SQLModel, table=True):
    """One attempt to deliver a notification: what the shop's endpoint answered, or why not."""

    __tablename__ = "notification_deliveries"

    id: int | None = Field(default=None, primary_key=True)
    notification_id: int = Field(foreign_key="notifications.id", index=True)
    number: int
    started_at: datetime
    duration_ms: float | None = None
    http_status: int | None = None
    outcome: str = Field(max_length=16)  # delivered | rejected | unreachable | not_sent
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
