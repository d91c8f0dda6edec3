"""Gateway callbacks (for gateways that call back when they settle): authenticate, record,
confirm.

A callback is not signed by the gateway, so it is authenticated by the per-job token refundq put
in the URL it handed out (`worker.gateways.callback_url`), and even then it is only a hint: it is
recorded as an event and triggers an immediate status poll; the *confirmed* answer drives the
transition (`worker.engine.poll_job`). Duplicate, late and racing callbacks are harmless: the
poll's transition is a compare-and-set from `awaiting_gateway`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlmodel import col

from providers.base import NotSupported
from worker import gateways, jobs, policy
from worker.db import read_session, write_session
from worker.errors import ProviderUnavailable, RefundqError
from worker.logs import get_logger
from worker.models import Event, Job, JobStatus
from worker.settings import get_settings

log = get_logger("refundq.callbacks")


class CallbackRejected(RefundqError):
    """The callback is not ours (401), about nothing we know (404), or unreadable (422)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class CallbackReceipt:
    job_id: str
    duplicate: bool  # the same notice was received before; recorded once
    confirming: bool  # a status poll was claimed and published to confirm it


def receive_callback(
    provider_id: str, token: str, body: bytes, *, publish_poll: Callable[[str], None]
) -> CallbackReceipt:
    """Authenticate and record one callback, and ask the gateway to confirm it."""
    job_id = gateways.job_from_callback_token(token)
    if job_id is None:
        raise CallbackRejected(401, "unknown callback token")
    try:
        provider_cls = gateways.provider_class(provider_id)
        notice = provider_cls.parse_callback(body)
    except (ProviderUnavailable, NotSupported):
        raise CallbackRejected(404, f"no callbacks for {provider_id!r}") from None
    except ValueError as exc:
        raise CallbackRejected(422, f"not a {provider_id} callback: {exc}") from None
    with read_session() as session:
        job = session.get(Job, job_id)
        if job is None or job.provider != provider_id:
            raise CallbackRejected(404, "unknown job")
        if job.provider_reference != notice.provider_reference:
            raise CallbackRejected(404, f"unknown reference {notice.provider_reference!r}")
        awaiting = job.status == JobStatus.AWAITING_GATEWAY.value
    duplicate = _record(job_id, dict(notice.details))
    confirming = False
    if awaiting:
        claim = jobs.claim_poll(
            job_id, policy.poll_schedule(get_settings()), actor="callback", force=True
        )
        if claim is jobs.PollClaim.POLL:
            publish_poll(job_id)
            confirming = True
    log.info(
        "callback.received",
        job_id=job_id,
        provider=provider_id,
        duplicate=duplicate,
        confirming=confirming,
        claimed=notice.claimed_outcome,
    )
    return CallbackReceipt(job_id=job_id, duplicate=duplicate, confirming=confirming)


def _record(job_id: str, details: dict[str, str]) -> bool:
    """Record the callback as an event unless the very same notice is already recorded."""
    with write_session() as session:
        seen = (
            session.execute(
                select(col(Event.detail)).where(
                    col(Event.job_id) == job_id, col(Event.kind) == "callback"
                )
            )
            .scalars()
            .all()
        )
        if details in seen:
            return True
        jobs.record_event(
            session,
            job_id,
            kind="callback",
            actor="gateway-callback",
            note="callback received; confirming with the gateway",
            detail=details,
        )
        return False
