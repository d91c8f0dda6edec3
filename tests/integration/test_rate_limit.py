"""A per-gateway rate limit is shared by every worker: with R calls/s configured for bbmsl, the
gateway never sees more than R calls in any one-second window, and other gateways' jobs are not
held up behind it. (Throughput against R is measured in bench/, not asserted here.)"""

from __future__ import annotations

from datetime import datetime

from tests.support.stack import Stack, unique
from worker.client import enqueue_refund, get_job_detail

FINAL = {"succeeded", "declined", "failed", "unknown"}
RATE = 5


def test_a_gateways_rate_limit_holds_across_workers_and_starves_no_other_gateway(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_RATE_LIMITS=f'{{"bbmsl": {RATE}}}')
    stack.start(workers=2, concurrency=3)
    bbmsl_refs = [unique("rl-bb") for _ in range(30)]
    for ref in bbmsl_refs:
        stack.sandbox.create_payment("bbmsl", ref, "20.00", "HKD")
    pgv2_ref = unique("rl-pg")
    stack.sandbox.create_payment("pgv2", pgv2_ref, "20.00", "INR")

    limited = [
        enqueue_refund(
            provider="bbmsl",
            payment_ref=ref,
            amount="20.00",
            currency="HKD",
            idempotency_key=unique("k"),
        )
        for ref in bbmsl_refs
    ]
    other = enqueue_refund(
        provider="pgv2",
        payment_ref=pgv2_ref,
        amount="20.00",
        currency="INR",
        idempotency_key=unique("k"),
    )

    # The unlimited gateway's job goes through while bbmsl's queue is still draining.
    assert stack.wait_status(other.id, FINAL, timeout=20).status == "succeeded"
    done_while_other = sum(1 for j in limited if get_job_detail(j.id).status == "succeeded")
    assert done_while_other < len(limited)
    for job in limited:
        assert stack.wait_status(job.id, FINAL, timeout=60).status == "succeeded"

    arrivals = sorted(
        datetime.fromisoformat(c["at"].replace("Z", "+00:00"))
        for c in stack.sandbox.calls("bbmsl")
        if c["payment_ref"] in bbmsl_refs
    )
    assert len(arrivals) == len(bbmsl_refs)
    busiest = max(
        sum(1 for later in arrivals[i:] if (later - first).total_seconds() < 1.0)
        for i, first in enumerate(arrivals)
    )
    span = (arrivals[-1] - arrivals[0]).total_seconds()
    print(
        f"\n{len(arrivals)} calls in {span:.1f}s ({len(arrivals) / span:.2f}/s), "
        f"busiest second {busiest}"
    )
    assert busiest <= RATE, f"{busiest} calls within one second (limit {RATE})"
    # Jobs that waited for a far slot were handed back without spending an attempt.
    assert all(get_job_detail(j.id).attempts == 1 for j in limited)
