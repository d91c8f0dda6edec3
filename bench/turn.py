"""One refund's database work, through refundq's own functions: what `bench writes` times and
what `bench floor` records to send again without refundq around it."""

from __future__ import annotations

from typing import Any

from providers.base import Capabilities, GatewayResult, Kind, Outcome

CAPABILITIES = Capabilities(kinds=frozenset(Kind), status_query=False, resend_safe=False)
SUCCESS = GatewayResult(Outcome.SUCCEEDED, provider_reference="r1", raw_status="ok")


def enqueue(job_id: str, payment_ref: str, idempotency_key: str) -> None:
    """`worker.jobs.insert_job` of a refund: the payment's lock on PostgreSQL, one read, the
    job and its event, one transaction."""
    from worker import jobs

    new = jobs.NewJob(
        kind=Kind.REFUND,
        provider="vai247",
        payment_ref=payment_ref,
        currency="USD",
        amount_minor=500,
        original_amount_minor=5000,
        reason="event cancelled",
        extras={},
        idempotency_key=idempotency_key,
    )
    jobs.insert_job(new, job_id)


def claim(job_id: str, owner: str) -> tuple[Any, int]:
    """`worker.jobs.claim_job` with the turn's first attempt recorded, as a worker claims a
    job for a gateway without a rate limit: (the claim, the attempt's id)."""
    from worker import jobs

    claimed = jobs.claim_job(
        job_id, owner, 60, first_call=lambda _claim: ("send", {"amount": "5.00"})
    )
    if claimed is None or claimed[1] is None:
        raise RuntimeError(f"{job_id} was not claimed with its attempt")
    return claimed[0], claimed[1]


def succeed(held: Any, attempt_id: int) -> None:
    """`worker.jobs.apply` of the gateway's success."""
    from worker import jobs

    decision = jobs.decide_result(held, CAPABILITIES, SUCCESS, (60.0,), 3600.0)
    turn = jobs.apply(
        held,
        attempt_id,
        decision,
        attempt_outcome="succeeded",
        http_status=200,
        code=None,
        message=None,
        duration_ms=1.0,
    )
    if turn.status is None:
        raise RuntimeError(f"{held.job_id}: the outcome found the job moved")
