"""Reconciliation: compare what we hold with what the gateways say, close the books.

For every job not final (awaiting the gateway, or `unknown`) and every job finalised in the
window, ask the gateway where it can tell (its status query, by our reference or by the
gateway's), then:

* correct what is provably wrong, through the state machine, with a `reconciled` event —
  an `unknown` job the gateway can now answer for, an awaiting job the gateway has settled;
* report what cannot be corrected automatically — a final job the gateway contradicts (money
  may have moved: a human decides), an `unknown` job at a gateway that cannot be asked;
* leave in-flight jobs (queued, submitting, retry_wait) to the engine.

The report is a JSON document (`Report.model_dump_json`) and a table (`refundq reconcile`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import or_, select
from sqlmodel import col

from providers.base import GatewayError, GatewayResult, Outcome
from worker import gateways, jobs, policy
from worker.clock import iso, utcnow
from worker.db import read_session, write_session
from worker.errors import ProviderUnavailable
from worker.logs import get_logger
from worker.models import FINAL_STATUSES, Job, JobStatus
from worker.settings import get_settings

log = get_logger("refundq.reconcile")
S = JobStatus
IN_FLIGHT = (S.QUEUED, S.SUBMITTING, S.RETRY_WAIT)
DEFAULT_WINDOW = timedelta(days=1)


class Finding(BaseModel):
    job_id: str
    provider: str
    payment_ref: str
    held: str  # our status before reconciliation
    gateway: str | None  # what the gateway said (outcome/raw status), None if not asked
    action: str  # "corrected" | "agrees" | "needs_human" | "unreachable" | "moved"
    now: str  # our status after reconciliation
    why: str


class Report(BaseModel):
    started_at: str
    finished_at: str
    since: str
    provider: str | None
    counts: dict[str, dict[str, int]]  # provider -> status -> jobs (after reconciliation)
    checked: int
    in_flight: int
    corrected: list[Finding]
    needs_human: list[Finding]
    unreachable: list[Finding]
    agreed: int


Progress = Callable[[int, int], None]


def reconcile(
    *,
    since: datetime | None = None,
    provider: str | None = None,
    actor: str = "reconcile",
    progress: Progress | None = None,
) -> Report:
    """Reconcile jobs of `provider` (all by default) not final, or finalised since `since`
    (default: the last day)."""
    settings = get_settings()
    started = utcnow()
    since = since or started - DEFAULT_WINDOW
    schedule = policy.poll_schedule(settings)
    candidates = _candidates(since, provider)
    findings: list[Finding] = []
    for index, job in enumerate(candidates, start=1):
        findings.append(_reconcile_one(job, actor, schedule, settings.poll_deadline_seconds))
        if progress is not None:
            progress(index, len(candidates))
    for finding in findings:
        # Agreement is the common case; what needed doing (or a human) is worth a log line.
        emit = log.debug if finding.action == "agrees" else log.info
        emit("reconcile.finding", **finding.model_dump())
    return Report(
        started_at=iso(started) or "",
        finished_at=iso(utcnow()) or "",
        since=iso(since) or "",
        provider=provider,
        counts=_counts(provider),
        checked=len(findings),
        in_flight=_in_flight(provider),
        corrected=[f for f in findings if f.action == "corrected"],
        needs_human=[f for f in findings if f.action == "needs_human"],
        unreachable=[f for f in findings if f.action in ("unreachable", "moved")],
        agreed=sum(1 for f in findings if f.action == "agrees"),
    )


def _candidates(since: datetime, provider: str | None) -> list[Job]:
    with read_session() as session:
        query = select(Job).where(
            or_(
                col(Job.status).in_([S.AWAITING_GATEWAY.value, S.UNKNOWN.value]),
                (col(Job.status).in_([s.value for s in FINAL_STATUSES]))
                & (col(Job.finished_at) >= since),
            )
        )
        if provider is not None:
            query = query.where(col(Job.provider) == provider)
        return list(session.execute(query.order_by(col(Job.created_at))).scalars())


def _reconcile_one(
    job: Job, actor: str, schedule: Sequence[float], deadline_seconds: float
) -> Finding:
    held = JobStatus(job.status)

    def finding(
        action: str, why: str, gateway: str | None = None, now: JobStatus | None = None
    ) -> Finding:
        return Finding(
            job_id=job.id,
            provider=job.provider,
            payment_ref=job.payment_ref,
            held=held.value,
            gateway=gateway,
            action=action,
            now=(now or held).value,
            why=why,
        )

    try:
        capabilities = gateways.provider_class(job.provider).capabilities
    except ProviderUnavailable as exc:
        return finding("needs_human", f"provider unknown to this deployment: {exc.message}")
    askable = capabilities.status_query and (
        capabilities.status_by_own_reference or job.provider_reference is not None
    )
    if not askable:
        if held is S.UNKNOWN:
            return finding(
                "needs_human",
                f"{job.provider} cannot be asked about this refund (no status query, or no "
                "gateway reference came back); check with the gateway, then "
                f"`refundq resolve {job.id} --as …`",
            )
        return finding("agrees", "nothing to compare: the gateway cannot be asked")
    try:
        provider = gateways.get_provider(job.provider)
    except ProviderUnavailable as exc:
        return finding("unreachable", exc.message)
    claim = jobs.claim_of(job, actor)
    attempt_id = jobs.record_poll(claim, job.attempt_count, purpose="reconcile")
    started = time.perf_counter()
    result: GatewayResult | None = None
    error: GatewayError | None = None
    try:
        result = provider.status(claim.gateway_request())
    except GatewayError as exc:
        error = exc
    with write_session() as session:
        jobs.finish_check(
            session,
            attempt_id,
            result=result,
            error=error,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
    if result is None:
        assert error is not None
        return finding("unreachable", f"could not ask the gateway now: {error.message}")
    said = f"{result.outcome.value}" + (f" ({result.raw_status})" if result.raw_status else "")
    return _compare(job, held, result, said, actor, schedule, deadline_seconds, finding)


def _compare(  # noqa: PLR0917 - the context of one comparison
    job: Job,
    held: JobStatus,
    result: GatewayResult,
    said: str,
    actor: str,
    schedule: Sequence[float],
    deadline_seconds: float,
    finding: Callable[..., Finding],
) -> Finding:
    outcome = result.outcome
    if held in (S.UNKNOWN, S.AWAITING_GATEWAY):
        if outcome is Outcome.UNRESOLVED:
            return finding(
                "needs_human",
                result.message or "the gateway's answer does not match this job",
                said,
            )
        if outcome is Outcome.PENDING and held is S.AWAITING_GATEWAY:
            return finding("agrees", "still pending at the gateway", said)
        if outcome is Outcome.NOT_FOUND and held is S.AWAITING_GATEWAY:
            moved = _move(job.id, held, S.UNKNOWN, result, actor)
            return finding(
                "needs_human",
                "we hold it as awaiting, but the gateway has no such refund request",
                said,
                moved or held,
            )
        moved = jobs.reconcile_transition(
            job.id,
            from_status=held,
            result=result,
            actor=actor,
            poll_delays=schedule,
            poll_deadline_seconds=deadline_seconds,
        )
        if moved is None:
            return finding("moved", "the job changed while we asked; run again", said)
        if moved in jobs.NOTIFY_STATUSES:
            from worker.engine import on_settled

            on_settled(job.id)
        return finding("corrected", f"the gateway says {said}", said, moved)
    # A final job: compare only. A contradiction is money that may have moved the wrong way.
    money_moved = outcome in (Outcome.SUCCEEDED, Outcome.PENDING)
    if held is S.SUCCEEDED and not money_moved:
        return finding("needs_human", f"we hold succeeded, the gateway says {said}", said)
    if held in (S.DECLINED, S.FAILED) and money_moved:
        return finding(
            "needs_human",
            f"we hold {held.value}, but the gateway says {said}: money may have moved",
            said,
        )
    return finding("agrees", "the gateway agrees", said)


def _move(
    job_id: str, held: JobStatus, to: JobStatus, result: GatewayResult, actor: str
) -> JobStatus | None:
    with write_session() as session:
        moved = jobs.transition(
            session,
            job_id,
            from_statuses=[held],
            to=to,
            actor=actor,
            values={
                "last_error_code": result.code or result.outcome.value.upper(),
                "last_error_message": result.message,
                "last_error_retryable": False,
            },
            note="reconciled: the gateway does not know this refund",
            event_kind="reconciled",
        )
    return to if moved else None


def _counts(provider: str | None) -> dict[str, dict[str, int]]:
    with read_session() as session:
        query = select(col(Job.provider), col(Job.status))
        if provider is not None:
            query = query.where(col(Job.provider) == provider)
        rows = session.execute(query).all()
    counts: dict[str, Counter[str]] = {}
    for row_provider, status in rows:
        counts.setdefault(row_provider, Counter())[status] += 1
    return {name: dict(sorted(c.items())) for name, c in sorted(counts.items())}


def _in_flight(provider: str | None) -> int:
    with read_session() as session:
        query = select(col(Job.id)).where(col(Job.status).in_([s.value for s in IN_FLIGHT]))
        if provider is not None:
            query = query.where(col(Job.provider) == provider)
        return len(session.execute(query).all())
