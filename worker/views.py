"""What producers and operators see of a job: one pydantic model for the Python API, the CLI's
`--json` and the HTTP API alike."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, field_serializer

from worker.clock import iso
from worker.models import Attempt, Event, Job
from worker.money import format_amount


class LastError(BaseModel):
    code: str | None
    message: str | None
    retryable: bool | None = None


class JobView(BaseModel):
    """A job as the outside world sees it. Amounts are strings ("50.00"), never floats."""

    model_config = ConfigDict(frozen=True)

    id: str
    kind: str
    provider: str
    payment_ref: str
    amount: str | None
    currency: str | None
    original_amount: str | None
    reason: str | None
    extras: dict[str, str]
    idempotency_key: str
    status: str
    provider_reference: str | None
    raw_status: str | None
    attempts: int
    last_error: LastError | None
    next_attempt_at: datetime | None
    next_poll_at: datetime | None
    notify_url: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @field_serializer("next_attempt_at", "next_poll_at", "created_at", "updated_at", "finished_at")
    def _times(self, moment: datetime | None) -> str | None:
        return iso(moment)

    @classmethod
    def of(cls, job: Job) -> JobView:
        error = None
        if job.last_error_code or job.last_error_message:
            error = LastError(
                code=job.last_error_code,
                message=job.last_error_message,
                retryable=job.last_error_retryable,
            )
        return cls(
            id=job.id,
            kind=job.kind,
            provider=job.provider,
            payment_ref=job.payment_ref,
            amount=format_amount(job.amount_minor, job.currency),
            currency=job.currency,
            original_amount=format_amount(job.original_amount_minor, job.currency),
            reason=job.reason,
            extras={str(k): str(v) for k, v in (job.extras or {}).items()},
            idempotency_key=job.idempotency_key,
            status=job.status,
            provider_reference=job.provider_reference,
            raw_status=job.raw_status,
            attempts=job.attempt_count,
            last_error=error,
            next_attempt_at=job.next_attempt_at,
            next_poll_at=job.next_poll_at,
            notify_url=job.notify_url,
            created_at=job.created_at,
            updated_at=job.updated_at,
            finished_at=job.finished_at,
        )


class AttemptView(BaseModel):
    number: int
    purpose: str
    state: str
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None
    http_status: int | None
    outcome: str | None
    code: str | None
    message: str | None
    retry_delay_seconds: float | None

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptView:
        return cls(
            number=attempt.number,
            purpose=attempt.purpose,
            state=attempt.state,
            started_at=iso(attempt.started_at),
            finished_at=iso(attempt.finished_at),
            duration_ms=attempt.duration_ms,
            http_status=attempt.http_status,
            outcome=attempt.outcome_class,
            code=attempt.code,
            message=attempt.message,
            retry_delay_seconds=attempt.retry_delay_seconds,
        )


class EventView(BaseModel):
    at: str | None
    kind: str
    from_status: str | None
    to_status: str | None
    actor: str
    note: str | None
    detail: dict[str, Any] | None

    @classmethod
    def of(cls, event: Event) -> EventView:
        return cls(
            at=iso(event.at),
            kind=event.kind,
            from_status=event.from_status,
            to_status=event.to_status,
            actor=event.actor,
            note=event.note,
            detail=event.detail,
        )


class JobDetail(JobView):
    """A job with its gateway calls and its history (`refundq show`)."""

    attempt_log: list[AttemptView]
    events: list[EventView]
