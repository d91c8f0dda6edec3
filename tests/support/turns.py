"""A job's turn run in the test's own process, as a worker runs it: claimed with its first
attempt, answered "succeeded" by the gateway, applied."""

from __future__ import annotations

from providers.base import Capabilities, GatewayResult, Kind, Outcome
from worker import jobs

_CAPABILITIES = Capabilities(kinds=frozenset(Kind), status_query=False, resend_safe=False)
_ANSWER = GatewayResult(Outcome.SUCCEEDED, provider_reference="r1", raw_status="ok")


def a_successful_turn(job_id: str) -> jobs.Turn:
    claimed = jobs.claim_job(job_id, "test", 60, first_call=lambda _claim: ("send", {"a": "1"}))
    assert claimed is not None and claimed[1] is not None, "claimed, with its attempt"
    claim, attempt_id = claimed
    return jobs.apply(
        claim,
        attempt_id,
        jobs.decide_result(claim, _CAPABILITIES, _ANSWER, (60.0,), 3600.0),
        attempt_outcome="succeeded",
        http_status=200,
        code=None,
        message=None,
        duration_ms=1.0,
    )
