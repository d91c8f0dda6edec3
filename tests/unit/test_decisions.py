"""Rule 5 and the retry limits, decided from capabilities alone (no database, no gateway)."""

from __future__ import annotations

import pytest

from providers.base import (
    Ambiguous,
    Capabilities,
    GatewayResult,
    Kind,
    NotSent,
    Outcome,
    RateLimited,
)
from worker import jobs
from worker.models import JobStatus
from worker.policy import RetryPolicy

NO_QUERY_NO_KEY = Capabilities(
    kinds=frozenset({Kind.REFUND}), status_query=False, resend_safe=False, max_attempts=3
)  # vai247
QUERY_BY_OWN_REF = Capabilities(
    kinds=frozenset({Kind.REFUND}),
    status_query=True,
    resend_safe=True,
    status_by_own_reference=True,
)  # bbmsl, pgv2
QUERY_BY_GATEWAY_REF = Capabilities(
    kinds=frozenset({Kind.REFUND}), status_query=True, resend_safe=False, settles_async=True
)  # vaultspay
RESEND_ONLY = Capabilities(kinds=frozenset({Kind.REFUND}), status_query=False, resend_safe=True)
RETRY = RetryPolicy(base_seconds=0.2, cap_seconds=2, floor_seconds=0.1)


def claim(
    attempt: int = 1,
    *,
    needs_check: bool = False,
    ambiguous: int = 0,
    provider_reference: str | None = None,
) -> jobs.Claim:
    return jobs.Claim(
        job_id="j" * 32,
        lease_owner="w",
        kind=Kind.REFUND,
        provider="p",
        payment_ref="ord",
        currency="USD",
        amount_minor=5000,
        original_amount_minor=None,
        reason=None,
        extras={},
        provider_reference=provider_reference,
        attempt_count=attempt,
        needs_status_check=needs_check,
        ambiguous_sends=ambiguous,
        previous_status="queued",
    )


def test_ambiguous_send_to_a_gateway_that_cannot_be_asked_or_resent_becomes_unknown():
    decision = jobs.decide_error(claim(), NO_QUERY_NO_KEY, Ambiguous("read timeout"), "send", RETRY)
    assert decision.to is JobStatus.UNKNOWN
    assert decision.values["ambiguous_sends"] == 1
    assert "rule 5" in (decision.note or "")


def test_ambiguous_send_to_a_gateway_with_a_status_query_asks_before_anything_else():
    decision = jobs.decide_error(claim(), QUERY_BY_OWN_REF, Ambiguous("reset"), "send", RETRY)
    assert decision.to is JobStatus.RETRY_WAIT
    assert decision.values["needs_status_check"] is True


def test_a_status_query_that_needs_the_gateways_reference_cannot_resolve_a_lost_create():
    decision = jobs.decide_error(claim(), QUERY_BY_GATEWAY_REF, Ambiguous("timeout"), "send", RETRY)
    assert decision.to is JobStatus.UNKNOWN
    assert jobs.ambiguity_resolution(QUERY_BY_GATEWAY_REF, "RFRQ_1") is jobs.Resolution.ASK


def test_ambiguous_send_to_an_idempotent_gateway_without_query_is_resent():
    decision = jobs.decide_error(claim(), RESEND_ONLY, Ambiguous("timeout"), "send", RETRY)
    assert decision.to is JobStatus.RETRY_WAIT
    assert decision.values["needs_status_check"] is False


@pytest.mark.parametrize("error", [NotSent("refused"), RateLimited("429", retry_after=1.5)])
def test_not_sent_errors_retry_with_backoff_until_attempts_run_out_then_fail(error):
    first = jobs.decide_error(claim(1), NO_QUERY_NO_KEY, error, "send", RETRY)
    assert first.to is JobStatus.RETRY_WAIT
    assert first.retry_delay is not None and first.retry_delay > 0
    if isinstance(error, RateLimited):
        assert first.retry_delay >= 1.5
    last = jobs.decide_error(claim(3), NO_QUERY_NO_KEY, error, "send", RETRY)
    assert last.to is JobStatus.FAILED
    assert "never received it" in (last.note or "")


def test_running_out_of_attempts_with_an_unresolved_send_is_unknown_not_failed():
    decision = jobs.decide_error(
        claim(6, needs_check=True, ambiguous=1),
        QUERY_BY_OWN_REF,
        NotSent("down"),
        "status",
        RETRY,
    )
    assert decision.to is JobStatus.UNKNOWN


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (Outcome.SUCCEEDED, JobStatus.SUCCEEDED),
        (Outcome.DECLINED, JobStatus.DECLINED),
        (Outcome.FAILED, JobStatus.FAILED),
        (Outcome.PENDING, JobStatus.AWAITING_GATEWAY),
        (Outcome.UNRESOLVED, JobStatus.UNKNOWN),
    ],
)
def test_gateway_answers_map_to_states(outcome, status):
    result = GatewayResult(outcome=outcome, provider_reference="r1", code="C", message="m")
    decision = jobs.decide_result(claim(), QUERY_BY_OWN_REF, result, [60.0], 600.0)
    assert decision.to is status
    assert decision.values["provider_reference"] == "r1"
    if status is JobStatus.AWAITING_GATEWAY:
        assert decision.values["next_poll_at"] is not None


def test_every_transition_in_the_table_is_checked():
    with pytest.raises(jobs.TransitionError):
        jobs.check_transition([JobStatus.SUCCEEDED], JobStatus.QUEUED)
    with pytest.raises(jobs.TransitionError):
        jobs.check_transition([JobStatus.DECLINED], JobStatus.SUBMITTING)
    jobs.check_transition([JobStatus.QUEUED, JobStatus.RETRY_WAIT], JobStatus.SUBMITTING)


def test_an_outage_is_waited_out_within_the_patience_window_then_fails():
    import dataclasses
    from datetime import timedelta

    from worker.clock import utcnow

    patient = dataclasses.replace(RETRY, patience_seconds=600)
    young = dataclasses.replace(claim(3), created_at=utcnow() - timedelta(seconds=30))
    old = dataclasses.replace(claim(3), created_at=utcnow() - timedelta(seconds=700))
    assert jobs.decide_error(young, NO_QUERY_NO_KEY, NotSent("503"), "send", patient).to is (
        JobStatus.RETRY_WAIT
    )
    assert jobs.decide_error(old, NO_QUERY_NO_KEY, NotSent("503"), "send", patient).to is (
        JobStatus.FAILED
    )
    # Patience never stretches an ambiguous send: that one is decided by rule 5 at once.
    assert jobs.decide_error(young, NO_QUERY_NO_KEY, Ambiguous("reset"), "send", patient).to is (
        JobStatus.UNKNOWN
    )


def test_a_status_check_that_cannot_reach_the_gateway_is_also_patient():
    import dataclasses
    from datetime import timedelta

    from worker.clock import utcnow

    patient = dataclasses.replace(RETRY, patience_seconds=600)
    checking = dataclasses.replace(
        claim(6, needs_check=True, ambiguous=1), created_at=utcnow() - timedelta(seconds=30)
    )
    decision = jobs.decide_error(checking, QUERY_BY_OWN_REF, NotSent("503"), "status", patient)
    assert decision.to is JobStatus.RETRY_WAIT
    expired = dataclasses.replace(checking, created_at=utcnow() - timedelta(seconds=900))
    assert (
        jobs.decide_error(expired, QUERY_BY_OWN_REF, NotSent("503"), "status", patient).to
        is JobStatus.UNKNOWN
    )
