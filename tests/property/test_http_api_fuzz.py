"""A fuzz run of the HTTP API from its own OpenAPI schema (schemathesis): whatever a client
sends — valid, malformed, random strings, wrong types, huge numbers, unicode — the API answers
without a server error, and a request it refuses leaves nothing stored and nothing published."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from sqlalchemy import func, select

from tests.support.stack import Stack
from worker.apikeys import new_key
from worker.db import read_session
from worker.models import Job

KEY, STORED = new_key("fuzzer")


@pytest.fixture(scope="module")
def api_stack(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Stack]:
    """An API on SQLite with one key and no worker: what is published stays countable."""
    from tests.conftest import _stack_factory

    stacks: list[Stack] = []
    stack = _stack_factory("sqlite", request, tmp_path_factory, stacks)(
        REFUNDQ_API_KEYS=STORED.line()
    )
    stack.broker().delete("refundq")
    stack.start_api()
    yield stack
    stack.stop_all()
    stack.deactivate()


def footprint(stack: Stack) -> tuple[int, int]:
    with read_session() as session:
        stored = session.execute(select(func.count()).select_from(Job)).scalar_one()
    return stored, stack.broker().llen("refundq")


def test_the_api_never_answers_with_a_server_error(api_stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{api_stack.api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/refunds", "/v1/cancellations", "/v1/jobs"}
    for operation in operations:
        # Hypothesis drives each operation's cases; schemathesis generates them from the schema
        # (its pytest plugin is not used: it does not run under pytest 9).
        @settings(
            max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            before = footprint(api_stack)
            authorized = case.call(
                base_url=api_stack.api_url, headers={"Authorization": f"Bearer {KEY}"}
            )
            assert authorized.status_code < 500, (case.method, case.path, authorized.text)
            if case.method.upper() == "POST" and case.path.startswith("/v1/"):
                if authorized.status_code >= 400:
                    assert footprint(api_stack) == before, authorized.text
                    assert "error" in authorized.json()
                else:
                    assert authorized.status_code in (200, 202)
            # The same request without a key is refused before anything else happens.
            anonymous = case.call(base_url=api_stack.api_url)
            assert anonymous.status_code < 500
            if case.path.startswith("/v1/"):
                assert anonymous.status_code == 401

        check()
