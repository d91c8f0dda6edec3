"""A per-gateway rate limit is shared by every worker: with R calls/s configured for bbmsl, the
gateway never sees more than R calls in any one-second window, and other gateways' jobs are not
held up behind it. (Throughput against R is measured in bench/, not asserted here.)"""

from __future__ import annotations

import time
from datetime import datetime

from tests.support.stack import Stack, unique
from worker.client import enqueue_refund, get_job_detail
from worker.ratelimit import LATE_TOLERANCE_SECONDS, UNLIMITED, RateLimiter
from worker.views import JobView

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

    limited = _refund_each(bbmsl_refs)
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

    arrivals = _arrivals(stack, bbmsl_refs)
    assert len(arrivals) == len(bbmsl_refs)
    busiest = _busiest_second(arrivals)
    span = (arrivals[-1] - arrivals[0]).total_seconds()
    print(
        f"\n{len(arrivals)} calls in {span:.1f}s ({len(arrivals) / span:.2f}/s), "
        f"busiest second {busiest}"
    )
    assert busiest <= RATE, f"{busiest} calls within one second (limit {RATE})"
    # Jobs that waited for a far slot were handed back without spending an attempt.
    assert all(get_job_detail(j.id).attempts == 1 for j in limited)


def test_the_limit_holds_when_calls_leave_late_for_their_slots(stack_factory):
    """A slot is taken before the attempt's commit; a slow commit (here: a random pause of up
    to 0.6 s between the commit and the call, as on a loaded machine) makes calls late, and
    late calls would crowd the next second. They take a fresh slot instead."""
    stack: Stack = stack_factory(
        REFUNDQ_RATE_LIMITS=f'{{"bbmsl": {RATE}}}', REFUNDQ_FAILPOINTS="before_send=jitter(0.6)"
    )
    stack.start(workers=2, concurrency=3)
    refs = [unique("late-bb") for _ in range(20)]
    for ref in refs:
        stack.sandbox.create_payment("bbmsl", ref, "20.00", "HKD")
    limited = _refund_each(refs)
    for job in limited:
        assert stack.wait_status(job.id, FINAL, timeout=60).status == "succeeded"

    arrivals = _arrivals(stack, refs)
    assert len(arrivals) == len(refs)
    assert _busiest_second(arrivals) <= RATE


def _refund_each(refs: list[str]) -> list[JobView]:
    """Refund 20.00 HKD of each bbmsl payment."""
    return [
        enqueue_refund(
            provider="bbmsl",
            payment_ref=ref,
            amount="20.00",
            currency="HKD",
            idempotency_key=unique("k"),
        )
        for ref in refs
    ]


def _arrivals(stack: Stack, refs: list[str]) -> list[datetime]:
    return sorted(
        datetime.fromisoformat(c["at"].replace("Z", "+00:00"))
        for c in stack.sandbox.calls("bbmsl")
        if c["payment_ref"] in refs
    )


def _busiest_second(arrivals: list[datetime]) -> int:
    """The most calls in any one-second window (sliding: every window counts)."""
    return max(
        sum(1 for later in arrivals[i:] if (later - first).total_seconds() < 1.0)
        for i, first in enumerate(arrivals)
    )


def test_a_slot_the_call_is_late_for_is_replaced_by_a_fresh_one(redis_server):
    provider = unique("gw")
    limiter = RateLimiter(redis_server.url_for(0), {provider: 5.0})

    slot = limiter.wait_for_slot(provider)
    assert slot.granted
    assert limiter.keep_on_time(provider, slot, within=5) is slot  # on time: kept

    time.sleep(0.3)  # a slow commit between taking the slot and the call
    assert slot.late_by() >= 0.3 > LATE_TOLERANCE_SECONDS
    fresh = limiter.keep_on_time(provider, slot, within=5)
    assert fresh is not slot
    assert fresh.granted
    assert fresh.late_by() <= LATE_TOLERANCE_SECONDS
    assert fresh.earliest is not None and slot.earliest is not None
    assert fresh.earliest - slot.earliest >= 0.3

    # No on-time slot within the time allowed: refused, and the call must not be made.
    time.sleep(0.1)
    assert not limiter.keep_on_time(provider, fresh, within=0).granted


def test_an_unlimited_gateway_is_always_on_time(redis_server):
    limiter = RateLimiter(redis_server.url_for(0), {unique("gw"): 5.0})
    slot = limiter.wait_for_slot("pgv2")
    assert slot is UNLIMITED
    assert limiter.keep_on_time("pgv2", slot, within=0) is slot
