"""One job's turn with a worker, and the beat sweeps: the glue between `worker.jobs` (state),
a provider (the gateway) and a publisher (Celery). No status is written here — `worker.jobs`
does that; this module decides which gateway call to make and hands the outcome over.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from providers.base import (
    Ambiguous,
    Capabilities,
    GatewayError,
    GatewayRequest,
    GatewayResult,
    Outcome,
    RateLimited,
)
from worker import gateways, jobs, policy, ratelimit
from worker.clock import utcnow
from worker.errors import ProviderUnavailable
from worker.failpoints import failpoint
from worker.logs import get_logger
from worker.models import JobStatus
from worker.settings import Settings, get_settings

log = get_logger("refundq.engine")

Publish = Callable[[str, float | None], None]


def worker_name() -> str:
    """A lease owner name unique to this turn: host, process, and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class CallOutcome:
    result: GatewayResult | None
    error: GatewayError | None
    duration_ms: float


def execute_job(job_id: str, *, publish: Publish, owner: str | None = None) -> str:
    """Claim `job_id`, talk to its gateway once (status check first if a send was ambiguous),
    apply the outcome, publish the retry if one is due. Returns what happened, for the task log.
    Safe to run twice, late, or after a crash: only a successful claim does anything."""
    settings = get_settings()
    owner = owner or worker_name()
    limiter = ratelimit.limiter(settings)
    claimed = jobs.claim_job(
        job_id, owner, settings.lease_seconds, first_call=_first_call_now(limiter)
    )
    if claimed is None:
        log.debug("job.not_claimed", job_id=job_id)
        return "not claimed"
    claim, recorded = claimed
    failpoint("after_claim")
    bound = log.bind(job_id=job_id, provider=claim.provider, attempt=claim.attempt_count)
    retry = policy.retry_policy(settings)
    try:
        provider = gateways.get_provider(claim.provider)
    except ProviderUnavailable as exc:
        turn = _give_up_unconfigured(claim, exc, settings, retry)
        bound.error("job.provider_unavailable", error=exc.message, status=_status(turn))
        return _after_turn(job_id, turn, publish, settings, claim)
    capabilities = provider.capabilities
    request = claim.gateway_request(callback_url=gateways.callback_url(claim.provider, job_id))

    if claim.needs_status_check:
        ready = _slot_and_attempt(limiter, claim, "status", request, recorded)
        if isinstance(ready, jobs.Turn):
            return _after_turn(job_id, ready, publish, settings, claim)
        slot, attempt_id = ready
        recorded = None  # spent on the status check; a send after it records its own
        outcome = _call_in_slot(provider.status, request, limiter, claim, slot)
        if outcome.result is not None and outcome.result.outcome is Outcome.NOT_FOUND:
            # The gateway never received the earlier send: sending now cannot refund twice.
            jobs.finish_status_check_not_found(claim, attempt_id, outcome.duration_ms)
            bound.info("job.status_check", outcome="not_found", next="send")
        else:
            turn = _apply(claim, attempt_id, capabilities, outcome, "status", settings, retry)
            bound.info(
                "job.status_check",
                outcome=_outcome_name(outcome),
                status=_status(turn),
                duration_ms=round(outcome.duration_ms, 1),
            )
            return _after_turn(job_id, turn, publish, settings, claim)

    ready = _slot_and_attempt(limiter, claim, "send", request, recorded)
    if isinstance(ready, jobs.Turn):
        return _after_turn(job_id, ready, publish, settings, claim)
    slot, attempt_id = ready
    failpoint("before_send")
    outcome = _call_in_slot(provider.submit, request, limiter, claim, slot)
    failpoint("after_send")
    turn = _apply(claim, attempt_id, capabilities, outcome, "send", settings, retry)
    bound.info(
        "job.attempt",
        kind=request.kind.value,
        outcome=_outcome_name(outcome),
        status=_status(turn),
        http_status=_http_status(outcome),
        code=_code(outcome),
        duration_ms=round(outcome.duration_ms, 1),
        retry_in=turn.delay_seconds,
    )
    return _after_turn(job_id, turn, publish, settings, claim)


def _first_call_now(limiter: ratelimit.RateLimiter | None) -> jobs.FirstCall:
    """The turn's first call for `jobs.claim_job` to record with the claim, when nothing stands
    between them: the provider is built (`gateways.warm` builds every configured one when a
    worker process starts) and its gateway has no rate limit to wait for."""

    def first_call(claim: jobs.Claim) -> tuple[str, dict[str, Any]] | None:
        if limiter is not None and limiter.limits.get(claim.provider):
            return None
        if gateways.built_provider(claim.provider) is None:
            # Not configured (the turn gives up without a call), or not built yet: building it
            # here would hold the transaction open through a TLS setup.
            return None
        purpose = "status" if claim.needs_status_check else "send"
        callback = gateways.callback_url(claim.provider, claim.job_id)
        return purpose, _summary(claim.gateway_request(callback_url=callback), purpose)

    return first_call


def _slot_and_attempt(
    limiter: ratelimit.RateLimiter | None,
    claim: jobs.Claim,
    purpose: str,
    request: GatewayRequest,
    recorded: int | None,
) -> tuple[ratelimit.Reservation, int] | jobs.Turn:
    """The rate-limit slot and the committed attempt row for the next call: the one recorded
    with the claim, or a slot waited for and then the attempt recorded; or the turn that hands
    the job back when no slot comes soon."""
    if recorded is not None:
        return ratelimit.UNLIMITED, recorded
    slot = _await_slot(limiter, claim)
    if isinstance(slot, jobs.Turn):
        return slot
    return slot, jobs.record_attempt(claim, purpose, _summary(request, purpose))


def _await_slot(
    limiter: ratelimit.RateLimiter | None, claim: jobs.Claim
) -> ratelimit.Reservation | jobs.Turn:
    """Wait for this gateway's rate limit to allow one call and return the slot; if that is
    too far off, hand the job back to the queue (no attempt spent) and return that turn."""
    if limiter is None:
        return ratelimit.UNLIMITED
    reservation = limiter.wait_for_slot(claim.provider)
    if reservation.granted:
        return reservation
    return jobs.release_claim(
        claim,
        reservation.wait_seconds,
        note=f"{claim.provider} rate limit: next slot in {reservation.wait_seconds:.1f}s",
    )


# How long a recorded attempt may wait for an on-time slot before it is given up as not sent.
ON_TIME_SLOT_WAIT_SECONDS = 6.0


def _call_in_slot(
    verb: Callable[[GatewayRequest], GatewayResult],
    request: GatewayRequest,
    limiter: ratelimit.RateLimiter | None,
    claim: jobs.Claim,
    slot: ratelimit.Reservation,
) -> CallOutcome:
    """The call, made on time for its rate-limit slot (worker/ratelimit.py: a slow attempt
    commit can make it late, and a late call crowds the next second). When no on-time slot
    comes, the call is not made, and the attempt says so (not sent: safe to send later)."""
    if limiter is not None:
        slot = limiter.keep_on_time(claim.provider, slot, within=ON_TIME_SLOT_WAIT_SECONDS)
        if not slot.granted:
            error = RateLimited(
                f"{claim.provider}: no rate-limit slot the call could leave on time for within "
                f"{ON_TIME_SLOT_WAIT_SECONDS:.0f}s; not sent, will be sent later",
                code="LOCAL_RATE_LIMIT",
                retry_after=slot.wait_seconds,
            )
            return CallOutcome(None, error, 0.0)
    return _call(verb, request)


def _call(verb: Callable[[GatewayRequest], GatewayResult], request: GatewayRequest) -> CallOutcome:
    started = time.perf_counter()
    try:
        result = verb(request)
    except GatewayError as exc:
        return CallOutcome(None, exc, (time.perf_counter() - started) * 1000)
    except Exception as exc:
        # We cannot tell whether the request left before the provider failed: ambiguous, the
        # safe reading. The traceback goes to the log for the developer who must fix it.
        log.exception("provider.bug", job_id=request.job_id, error=type(exc).__name__)
        error = Ambiguous(f"provider error {type(exc).__name__}: {exc}", code="PROVIDER_BUG")
        return CallOutcome(None, error, (time.perf_counter() - started) * 1000)
    return CallOutcome(result, None, (time.perf_counter() - started) * 1000)


def _apply(  # noqa: PLR0917 - one call site, all context of one turn
    claim: jobs.Claim,
    attempt_id: int,
    capabilities: Capabilities,
    outcome: CallOutcome,
    purpose: str,
    settings: Settings,
    retry: policy.RetryPolicy,
) -> jobs.Turn:
    if outcome.error is not None:
        error = outcome.error
        decision = jobs.decide_error(claim, capabilities, error, purpose, retry)
        return jobs.apply(
            claim,
            attempt_id,
            decision,
            attempt_outcome=error.outcome_class,
            http_status=error.http_status,
            code=error.code,
            message=error.message,
            duration_ms=outcome.duration_ms,
        )
    result = outcome.result
    assert result is not None
    if purpose == "status" and result.outcome is Outcome.FAILED:
        # The status query was refused for *our* fault (credentials): the earlier send's fate
        # is still unknown, so this is not "never reached the gateway".
        result = GatewayResult(
            outcome=Outcome.UNRESOLVED,
            code=result.code,
            message=f"status check refused: {result.message}",
            http_status=result.http_status,
        )
    decision = jobs.decide_result(
        claim, capabilities, result, policy.poll_schedule(settings), settings.poll_deadline_seconds
    )
    return jobs.apply(
        claim,
        attempt_id,
        decision,
        attempt_outcome=result.outcome.value,
        http_status=result.http_status,
        code=result.code,
        message=result.message,
        duration_ms=outcome.duration_ms,
    )


def _give_up_unconfigured(
    claim: jobs.Claim, exc: ProviderUnavailable, settings: Settings, retry: policy.RetryPolicy
) -> jobs.Turn:
    """The provider's settings vanished after enqueue. Nothing is sent in this turn; the job
    fails (or stays unknown, if an earlier send is unresolved) with the missing names."""
    attempt_id = jobs.record_attempt(claim, "send", {"skipped": "provider not configured"})
    sent_before = claim.ambiguous_sends > 0 or claim.needs_status_check
    decision = jobs.Decision(
        JobStatus.UNKNOWN if sent_before else JobStatus.FAILED,
        {
            "last_error_code": "NOT_CONFIGURED",
            "last_error_message": exc.message,
            "last_error_retryable": False,
        },
        note="provider not configured on this worker",
    )
    return jobs.apply(
        claim,
        attempt_id,
        decision,
        attempt_outcome="not_sent",
        http_status=None,
        code="NOT_CONFIGURED",
        message=exc.message,
        duration_ms=0.0,
    )


def _after_turn(
    job_id: str,
    turn: jobs.Turn,
    publish: Publish,
    settings: Settings,
    claim: jobs.Claim | None = None,
) -> str:
    # Longer waits stay in the database; the dispatcher publishes them when due.
    delay = turn.delay_seconds
    short_wait = delay is not None and delay <= settings.max_countdown_seconds
    if turn.next is jobs.Next.RETRY and short_wait:
        publish(job_id, delay)
    if turn.notify:
        on_settled(job_id, has_notify_url=None if claim is None else claim.notify_url is not None)
    return turn.status.value if turn.status else turn.next.value


def on_settled(job_id: str, *, has_notify_url: bool | None = None) -> None:
    """The one hook for a job reaching a final state or `unknown`, whoever moved it there (a
    worker's turn, a poll, the reaper, reconciliation, an operator). Notifications attach here.
    Must never raise into, or block, the caller: the job's own outcome is already committed.

    `has_notify_url`: what the caller already knows (a worker's claim carries the job's
    notify_url, which is written once, at enqueue); False spares the notification step its
    database read, None (unknown) lets it look."""
    # A job with a notify_url gets one notification per status change (recorded, then
    # published; worker/notify.py). Called twice for one transition, it records nothing new.
    try:
        from worker.notify import notify_settled

        if has_notify_url is not False:
            notify_settled(job_id)
    except Exception:
        log.exception("notify.on_settled_failed", job_id=job_id)


def _summary(request: GatewayRequest, purpose: str) -> dict[str, Any]:
    """What an attempt row records of the request: never credentials, never the callback
    token (it authenticates the callback)."""
    return {
        "purpose": purpose,
        "kind": request.kind.value,
        "payment_ref": request.payment_ref,
        "amount": None if request.amount is None else str(request.amount),
        "currency": request.currency or None,
        "provider_reference": request.provider_reference,
        "callback": request.callback_url is not None,
    }


def _outcome_name(outcome: CallOutcome) -> str:
    if outcome.error is not None:
        return outcome.error.outcome_class
    assert outcome.result is not None
    return outcome.result.outcome.value


def _http_status(outcome: CallOutcome) -> int | None:
    if outcome.error is not None:
        return outcome.error.http_status
    return outcome.result.http_status if outcome.result else None


def _code(outcome: CallOutcome) -> str | None:
    if outcome.error is not None:
        return outcome.error.code
    return outcome.result.code if outcome.result else None


def _status(turn: jobs.Turn) -> str | None:
    return turn.status.value if turn.status else None


# ---------------------------------------------------------------------------------------------
# Beat sweeps
# ---------------------------------------------------------------------------------------------


def capabilities_for(provider_id: str) -> Capabilities:
    return gateways.provider_class(provider_id).capabilities


def reap_expired(*, publish: Publish, reaper: str | None = None) -> dict[str, int]:
    """Jobs stuck in `submitting` whose lease ran out: apply rule 5 to each (see `jobs.reap`)."""
    settings = get_settings()
    reaper = reaper or f"reaper:{worker_name()}"
    retry = policy.retry_policy(settings)
    counts: dict[str, int] = {}
    for job_id in jobs.expired_leases(utcnow(), settings.dispatch_batch_size):
        turn = jobs.reap(job_id, reaper, capabilities_for, retry)
        if turn.status is None:
            continue
        counts[turn.status.value] = counts.get(turn.status.value, 0) + 1
        log.warning("job.reaped", job_id=job_id, status=turn.status.value)
        _after_turn(job_id, turn, publish, settings)
    return counts


def dispatch_queued(
    *, publish: Publish, waiting_since: Callable[[], datetime | None] | None = None
) -> int:
    """Publish jobs whose time has come and whose message may be lost. Two dispatchers at once
    publish each job once: `jobs.mark_published` is a compare-and-set.

    A message is presumed lost once it is `redispatch_after` overdue. Behind a backlog (a shop
    refunding thousands at once) messages wait longer than that and are not lost: re-published,
    each would run once more for nothing and lengthen the queue it waits in, tick after tick.
    So when `waiting_since()` says when the oldest message still waiting was published, only
    jobs whose message was due `redispatch_after` before *that* count as lost: the queue is
    first in, first out, so theirs is not in it."""
    settings = get_settings()
    now = utcnow()
    redispatch_after = timedelta(seconds=settings.redispatch_after_seconds)
    oldest_waiting = waiting_since() if waiting_since is not None else None
    stale = min(now, oldest_waiting or now) - redispatch_after
    due = jobs.due_for_dispatch(now, stale, settings.dispatch_batch_size)
    mine = jobs.mark_published(due, now, only_if_stale_before=stale)
    for job_id in mine:
        publish(job_id, None)
    if mine:
        log.info("dispatch.published", count=len(mine))
    return len(mine)


def poll_pending(
    *, publish_poll: Callable[[str], None], actor: str | None = None
) -> dict[str, int]:
    """One beat tick of settlement polling: claim every due job (a compare-and-set on its poll
    time) and publish one `poll_job` for each. Jobs past their deadline become `unknown`."""
    settings = get_settings()
    actor = actor or f"poller:{worker_name()}"
    schedule = policy.poll_schedule(settings)
    counts = {"polled": 0, "expired": 0}
    for job_id in jobs.due_polls(utcnow(), settings.poll_batch_size):
        claim = jobs.claim_poll(job_id, schedule, actor=actor)
        if claim is jobs.PollClaim.POLL:
            publish_poll(job_id)
            counts["polled"] += 1
        elif claim is jobs.PollClaim.EXPIRED:
            counts["expired"] += 1
            log.warning("job.poll_deadline", job_id=job_id, status="unknown")
            on_settled(job_id)
    return counts


def poll_job(job_id: str, *, actor: str | None = None) -> str:
    """Ask the gateway where an awaiting refund stands, and apply a definite answer. Harmless
    to run twice or late: a status query changes nothing at the gateway, and the transition is
    a compare-and-set from `awaiting_gateway`."""
    actor = actor or f"poller:{worker_name()}"
    target = jobs.poll_target(job_id, actor)
    if target is None:
        return "not awaiting"
    claim = target.claim
    provider = gateways.get_provider(claim.provider)
    limiter = ratelimit.limiter()
    slot = ratelimit.UNLIMITED if limiter is None else limiter.wait_for_slot(claim.provider)
    if not slot.granted:
        # No slot soon: skip this poll; the schedule already holds the next one.
        log.info("job.poll_deferred", job_id=job_id, provider=claim.provider)
        return "deferred"
    attempt_id = jobs.record_poll(claim, target.poll_count)
    outcome = _call_in_slot(provider.status, claim.gateway_request(), limiter, claim, slot)
    floor = None
    if isinstance(outcome.error, RateLimited) and outcome.error.retry_after:
        floor = utcnow() + timedelta(seconds=outcome.error.retry_after)
    status = jobs.apply_poll(
        claim,
        attempt_id,
        result=outcome.result,
        error=outcome.error,
        duration_ms=outcome.duration_ms,
        retry_after_floor=floor,
    )
    log.info(
        "job.poll",
        job_id=job_id,
        provider=claim.provider,
        poll=target.poll_count,
        outcome=_outcome_name(outcome),
        status=status.value if status else "awaiting_gateway",
        duration_ms=round(outcome.duration_ms, 1),
    )
    if status is not None:
        on_settled(job_id)
    return status.value if status else "awaiting_gateway"


def reconcile_daily() -> dict[str, int]:
    """The beat's daily reconciliation: run it, keep the report, return its figures."""
    from worker.reconcile import reconcile

    settings = get_settings()
    report = reconcile(actor="reconcile:beat")
    if settings.reports_dir is not None:
        settings.reports_dir.mkdir(parents=True, exist_ok=True)
        name = f"reconcile-{report.started_at.replace(':', '').replace('-', '')}.json"
        (settings.reports_dir / name).write_text(report.model_dump_json(indent=2) + "\n")
    figures = {
        "checked": report.checked,
        "corrected": len(report.corrected),
        "needs_human": len(report.needs_human),
        "unreachable": len(report.unreachable),
    }
    log.info("reconcile.done", **figures)
    return figures
