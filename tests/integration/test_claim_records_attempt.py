"""When the claim's transaction records the turn's first attempt (issue 7): only for a provider
already built, so the transaction never waits for a TLS setup or a key parse, and only for a
gateway without a rate limit. Real database (SQLite and PostgreSQL), real sandbox settings."""

from __future__ import annotations

from sqlalchemy import select

import providers
from tests.support.stack import Stack
from worker import engine, gateways, jobs, ratelimit
from worker.db import read_session
from worker.models import Attempt
from worker.settings import get_settings


def _claim(job_id: str) -> tuple[jobs.Claim, int | None]:
    limiter = ratelimit.limiter(get_settings())
    claimed = jobs.claim_job(job_id, "test", 60, first_call=engine._first_call_now(limiter))
    assert claimed is not None
    return claimed


def test_a_provider_not_built_yet_gets_its_attempt_recorded_apart(stack_factory):
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    gateways.reset()

    _, attempt_id = _claim(job_id)

    assert attempt_id is None
    assert gateways.built_provider("vai247") is None  # the claim did not build it


def test_once_warm_the_claim_records_the_send_attempt(stack_factory):
    stack: Stack = stack_factory()
    job_id = stack.refund_new_order()
    gateways.reset()
    gateways.warm()

    claim, attempt_id = _claim(job_id)

    assert all(gateways.built_provider(p) is not None for p in providers.provider_ids())
    assert attempt_id is not None
    (attempt,) = jobs_attempts(job_id)
    assert (attempt.id, attempt.purpose, attempt.state) == (attempt_id, "send", "sending")
    assert attempt.number == claim.attempt_count == 1


def test_a_rate_limited_gateway_gets_its_attempt_recorded_after_the_slot(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_RATE_LIMITS='{"vai247": 1000}')
    job_id = stack.refund_new_order()
    gateways.warm()

    _, attempt_id = _claim(job_id)

    assert attempt_id is None
    assert jobs_attempts(job_id) == []


def jobs_attempts(job_id: str) -> list[Attempt]:
    with read_session() as session:
        return list(session.execute(select(Attempt).where(Attempt.job_id == job_id)).scalars())
