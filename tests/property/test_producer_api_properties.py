"""Property-based tests of the Python producer API against a real database and broker: any
input is either a stored, published job holding exactly what was asked, or a clear
`InvalidRequest` with nothing stored and nothing published. Text is stored as given (SQL stays
parameterised: quotes, semicolons and SQL fragments come back byte for byte)."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from tests.support.stack import Stack
from worker.client import enqueue_cancel, enqueue_refund, get_job
from worker.db import read_session
from worker.errors import IdempotencyConflict, InvalidRequest
from worker.models import Job

_keys = itertools.count()

text_like = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["", " ", "'; DROP TABLE jobs; --", "\x00", "ü€😀", "a" * 129, "Robert'); --"]),
    st.integers(),
    st.none(),
    st.floats(),
    st.binary(max_size=10),
)
amount_like = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True, places=None),
    st.text(max_size=30),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),
    st.none(),
    st.sampled_from(["1e3", "NaN", "0.001", "99999999999999999", "12.34"]),
)


@pytest.fixture(scope="module")
def idle_stack(request, tmp_path_factory):
    """A SQLite stack with no worker: whatever is published stays in the queue, countable."""
    from tests.conftest import _stack_factory

    stacks: list[Stack] = []
    stack = _stack_factory("sqlite", request, tmp_path_factory, stacks)()
    yield stack
    stack.deactivate()


def counts(stack: Stack) -> tuple[int, int]:
    with read_session() as session:
        stored = session.execute(select(func.count()).select_from(Job)).scalar_one()
    return stored, stack.broker().llen("refundq")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    provider=st.one_of(st.sampled_from(["vai247", "bbmsl", "pgv2", "vaultspay"]), text_like),
    payment_ref=text_like,
    amount=amount_like,
    currency=st.one_of(st.sampled_from(["USD", "HKD", "INR", "AED", "XXX"]), text_like),
    reason=text_like,
)
def test_the_python_api_stores_exactly_what_was_asked_or_refuses_cleanly(
    idle_stack, provider, payment_ref, amount, currency, reason
):
    before = counts(idle_stack)
    key = f"prop-{next(_keys)}"
    try:
        job = enqueue_refund(
            provider=provider,
            payment_ref=payment_ref,
            amount=amount,
            currency=currency,
            idempotency_key=key,
            reason=reason,
        )
    except InvalidRequest as exc:
        assert exc.message and exc.field
        assert counts(idle_stack) == before
        return
    stored = get_job(job.id)
    assert stored.payment_ref == payment_ref
    assert stored.reason == (reason if isinstance(reason, str) and reason.strip() else None)
    assert Decimal(stored.amount) == Decimal(str(amount)).quantize(Decimal(stored.amount))
    assert counts(idle_stack) == (before[0] + 1, before[1] + 1)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    first=st.decimals(min_value=1, max_value=500, places=2),
    second=st.decimals(min_value=1, max_value=500, places=2),
)
def test_one_key_one_job_whatever_the_amounts(idle_stack, first, second):
    key, ref = f"prop-{next(_keys)}", f"prop-ref-{next(_keys)}"
    job = enqueue_refund(
        provider="vai247", payment_ref=ref, amount=first, currency="USD", idempotency_key=key
    )
    if first == second:
        again = enqueue_refund(
            provider="vai247", payment_ref=ref, amount=second, currency="USD", idempotency_key=key
        )
        assert again.id == job.id
    else:
        with pytest.raises(IdempotencyConflict):
            enqueue_refund(
                provider="vai247",
                payment_ref=ref,
                amount=second,
                currency="USD",
                idempotency_key=key,
            )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(extras=st.dictionaries(st.text(max_size=12), text_like, max_size=3))
def test_unknown_provider_extras_are_refused_not_ignored(idle_stack, extras):
    before = counts(idle_stack)
    try:
        enqueue_cancel(
            provider="vai247", payment_ref="o", idempotency_key=f"prop-{next(_keys)}", extras=extras
        )
    except InvalidRequest:
        assert counts(idle_stack) == before
        return
    assert not extras  # vai247 takes no extras: any given must have been refused
