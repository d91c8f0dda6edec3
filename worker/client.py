"""The producer API: `enqueue_refund`, `enqueue_cancel`, `get_job`, `list_jobs`.

    from worker.client import enqueue_refund
    job = enqueue_refund(provider="vai247", payment_ref="ord_abc123", amount="50.00",
                         currency="USD", idempotency_key="refund-ord_abc123-1")

Calls return a `JobView` at once, without waiting for the gateway. The job row commits first and
its message is published after (the row is the outbox: if the broker is down the dispatcher
publishes it later, DESIGN.md rule 1). Bad input raises `InvalidRequest` (nothing stored,
nothing published); the same idempotency key with a different request raises
`IdempotencyConflict`.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlmodel import col

from providers.base import GatewayRequest, InvalidForGateway, Kind
from worker import gateways, jobs
from worker.db import read_session
from worker.errors import InvalidRequest, JobNotFound
from worker.models import Attempt, Event, Job, JobStatus
from worker.money import currency_exponent, parse_amount, to_minor
from worker.views import AttemptView, EventView, JobDetail, JobView

log = logging.getLogger(__name__)

MAX_REF = 128
MAX_KEY = 255
MAX_REASON = 500
MAX_EXTRA = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URL = re.compile(r"https?://[^\s/$.?#][^\s]*", re.IGNORECASE)


def enqueue_refund(
    *,
    provider: str,
    payment_ref: str,
    amount: str | Decimal | int,
    currency: str,
    idempotency_key: str,
    reason: str | None = None,
    original_amount: str | Decimal | int | None = None,
    notify_url: str | None = None,
    extras: Mapping[str, str] | None = None,
    **provider_extras: str,
) -> JobView:
    """Refund `amount` `currency` of `payment_ref` through `provider`, exactly once.

    `original_amount`, when known, caps the sum of this payment's refunds (jobs in flight
    count). Provider extras (e.g. bbmsl `order_id`, vaultspay `partial`) may be given as
    keyword arguments or as `extras`.
    """
    return _enqueue(
        Kind.REFUND,
        provider=provider,
        payment_ref=payment_ref,
        amount=amount,
        currency=currency,
        idempotency_key=idempotency_key,
        reason=reason,
        original_amount=original_amount,
        notify_url=notify_url,
        extras={**(extras or {}), **provider_extras},
    )


def enqueue_cancel(
    *,
    provider: str,
    payment_ref: str,
    idempotency_key: str,
    reason: str | None = None,
    currency: str | None = None,
    notify_url: str | None = None,
    extras: Mapping[str, str] | None = None,
    **provider_extras: str,
) -> JobView:
    """Cancel the order `payment_ref` at `provider` (before it completes), exactly once."""
    return _enqueue(
        Kind.CANCEL,
        provider=provider,
        payment_ref=payment_ref,
        amount=None,
        currency=currency,
        idempotency_key=idempotency_key,
        reason=reason,
        original_amount=None,
        notify_url=notify_url,
        extras={**(extras or {}), **provider_extras},
    )


def get_job(job_id: str) -> JobView:
    """The job as it stands now; `JobNotFound` if there is none."""
    with read_session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        return JobView.of(job)


def get_job_detail(job_id: str) -> JobDetail:
    """The job with its gateway calls and its history."""
    with read_session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        attempts = (
            session.execute(
                select(Attempt).where(col(Attempt.job_id) == job_id).order_by(col(Attempt.id))
            )
            .scalars()
            .all()
        )
        events = (
            session.execute(
                select(Event).where(col(Event.job_id) == job_id).order_by(col(Event.id))
            )
            .scalars()
            .all()
        )
        view = JobView.of(job).model_dump()
        return JobDetail(
            **view,
            attempt_log=[AttemptView.of(a) for a in attempts],
            events=[EventView.of(e) for e in events],
        )


def list_jobs(
    *,
    status: str | None = None,
    provider: str | None = None,
    limit: int = 100,
    after: str | None = None,
) -> list[JobView]:
    """Jobs, newest first, optionally by status and provider. `after` is the last id of the
    previous page (keyset pagination: stable while jobs are being added)."""
    if status is not None and status not in {s.value for s in JobStatus}:
        raise InvalidRequest(
            "status", f"{status!r} is not a status; one of {', '.join(s.value for s in JobStatus)}"
        )
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit", "must be between 1 and 1000")
    with read_session() as session:
        query = select(Job)
        if status is not None:
            query = query.where(col(Job.status) == status)
        if provider is not None:
            query = query.where(col(Job.provider) == provider)
        if after is not None:
            anchor = session.get(Job, after)
            if anchor is None:
                raise InvalidRequest("after", f"no job {after!r} to continue after")
            query = query.where(
                (col(Job.created_at) < anchor.created_at)
                | ((col(Job.created_at) == anchor.created_at) & (col(Job.id) < anchor.id))
            )
        query = query.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit)
        return [JobView.of(job) for job in session.execute(query).scalars()]


def count_jobs_by_status() -> dict[str, int]:
    with read_session() as session:
        rows = session.execute(
            select(col(Job.status), func.count()).group_by(col(Job.status))
        ).all()
        return {status: count for status, count in rows}


# ---------------------------------------------------------------------------------------------


def _enqueue(
    kind: Kind,
    *,
    provider: str,
    payment_ref: str,
    amount: Any,
    currency: str | None,
    idempotency_key: str,
    reason: str | None,
    original_amount: Any,
    notify_url: str | None,
    extras: Mapping[str, Any],
) -> JobView:
    view, _created = submit(
        kind,
        provider=provider,
        payment_ref=payment_ref,
        amount=amount,
        currency=currency,
        idempotency_key=idempotency_key,
        reason=reason,
        original_amount=original_amount,
        notify_url=notify_url,
        extras=extras,
    )
    return view


def submit(
    kind: Kind,
    *,
    provider: Any,
    payment_ref: Any,
    idempotency_key: Any,
    amount: Any = None,
    currency: Any = None,
    reason: Any = None,
    original_amount: Any = None,
    notify_url: Any = None,
    extras: Mapping[str, Any] | None = None,
) -> tuple[JobView, bool]:
    """Validate and store a refund or cancel, publish it if it is new: `(view, created)`.

    `created` is False for a replay (the same idempotency key with the same request), whose
    view is the earlier job as it stands now. What `enqueue_refund`/`enqueue_cancel` do, for
    callers that must tell the two apart (the HTTP API answers 202 or 200). Raises
    `InvalidRequest` (nothing stored) and `IdempotencyConflict`.
    """
    new = build_new_job(
        kind,
        provider=provider,
        payment_ref=payment_ref,
        amount=amount,
        currency=currency,
        idempotency_key=idempotency_key,
        reason=reason,
        original_amount=original_amount,
        notify_url=notify_url,
        extras=extras or {},
    )
    view, created = jobs.insert_job(new, uuid.uuid4().hex)
    if created:
        publish_new(view.id)
    return view, created


def publish_new(job_id: str) -> None:
    """Publish a just-committed job. A broker that is down is not the producer's problem: the
    job is safe in the database and the dispatcher publishes it once the broker is back."""
    from worker.app import publish_job

    try:
        publish_job(job_id)
    except Exception:
        log.warning(
            "broker unavailable; job %s stays queued for the dispatcher", job_id, exc_info=True
        )


def build_new_job(
    kind: Kind,
    *,
    provider: Any,
    payment_ref: Any,
    amount: Any,
    currency: Any,
    idempotency_key: Any,
    reason: Any,
    original_amount: Any,
    notify_url: Any,
    extras: Mapping[str, Any],
) -> jobs.NewJob:
    """Validate a producer's request into a `NewJob`, or raise `InvalidRequest`."""
    if not isinstance(provider, str) or not provider:
        raise InvalidRequest("provider", "is required")
    provider_cls = gateways.provider_class(provider)
    capabilities = provider_cls.capabilities
    if kind not in capabilities.kinds:
        raise InvalidRequest(
            "kind",
            f"{provider} does not support {kind.value}s "
            f"(it supports: {', '.join(sorted(k.value for k in capabilities.kinds))})",
        )
    payment_ref = _text("payment_ref", payment_ref, MAX_REF, required=True)
    idempotency_key = _text("idempotency_key", idempotency_key, MAX_KEY, required=True)
    reason = _text("reason", reason, MAX_REASON, required=False)
    notify_url = _notify_url(notify_url)
    clean_extras = _extras(provider, provider_cls.extra_fields, extras)

    amount_minor = original_minor = None
    code: str | None = None
    decimal_amount = decimal_original = None
    if kind is Kind.REFUND:
        if currency is None or currency == "":
            raise InvalidRequest("currency", "is required for a refund")
        if amount is None or amount == "":
            raise InvalidRequest("amount", "is required for a refund")
        code, _exp = currency_exponent(currency)
        decimal_amount = parse_amount(amount, code)
        amount_minor = to_minor(decimal_amount, code)
        if original_amount is not None and original_amount != "":
            decimal_original = parse_amount(original_amount, code, field="original_amount")
            original_minor = to_minor(decimal_original, code)
            if amount_minor > original_minor:
                raise InvalidRequest(
                    "amount",
                    f"{decimal_amount} {code} is more than the original amount "
                    f"{decimal_original} {code}",
                )
    else:
        if amount is not None:
            raise InvalidRequest("amount", "a cancel has no amount")
        if currency is not None and currency != "":
            code, _exp = currency_exponent(currency)

    try:
        provider_cls.validate_request(
            GatewayRequest(
                job_id="0" * 32,
                kind=kind,
                payment_ref=payment_ref,
                currency=code or "",
                amount=decimal_amount,
                original_amount=decimal_original,
                reason=reason,
                extras=clean_extras,
            )
        )
    except InvalidForGateway as exc:
        raise InvalidRequest("request", str(exc)) from None
    # Last: a missing configuration is reported only for an otherwise valid request.
    gateways.provider_settings(provider)
    return jobs.NewJob(
        kind=kind,
        provider=provider,
        payment_ref=payment_ref,
        currency=code,
        amount_minor=amount_minor,
        original_amount_minor=original_minor,
        reason=reason,
        extras=clean_extras,
        idempotency_key=idempotency_key,
        notify_url=notify_url,
        single_refund_per_payment=capabilities.single_refund_per_payment,
    )


def _text(field: str, value: Any, limit: int, *, required: bool) -> Any:
    if value is None:
        if required:
            raise InvalidRequest(field, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidRequest(field, f"must be text, not {type(value).__name__}")
    if required and not value.strip():
        raise InvalidRequest(field, "must not be empty")
    if len(value) > limit:
        raise InvalidRequest(field, f"is {len(value)} characters long; the limit is {limit}")
    if _CONTROL.search(value):
        raise InvalidRequest(field, "must not contain control characters")
    return value if value.strip() else None


def _notify_url(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _URL.fullmatch(value) or len(value) > 2000:
        raise InvalidRequest("notify_url", f"{value!r} is not an http(s) URL")
    return value


def _extras(provider: str, allowed: Mapping[str, str], extras: Mapping[str, Any]) -> dict[str, str]:
    clean: dict[str, str] = {}
    for name, value in extras.items():
        if name not in allowed:
            known = ", ".join(f"{k} ({v})" for k, v in allowed.items()) or "none"
            raise InvalidRequest(name, f"is not a parameter of {provider}; its extras are: {known}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidRequest(name, f"must be text, not {type(value).__name__}")
        clean[name] = _text(name, str(value), MAX_EXTRA, required=True)
    return clean
