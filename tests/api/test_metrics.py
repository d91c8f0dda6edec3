"""`GET /metrics` after real jobs ran: the API process never calls a gateway, so every gateway
figure it shows was recorded by the worker (worker-side metrics, read from the database)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from tests.api.support import FINAL, order, refund_body, shop_client, wait_final
from tests.support.polling import wait_for
from tests.support.stack import Stack, unique
from worker.apikeys import new_key
from worker.db import read_session
from worker.models import Attempt, Job


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    text = shop_client(stack, None).get("/metrics").text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_show_jobs_gateway_latency_retries_unknowns_and_backlog_from_the_workers(
    stack_factory,
):
    # No beat: nothing claims the vaultspay poll, so it stays due (the polling backlog), and
    # the rate-limited job is retried by the worker's own countdown.
    key, stored = new_key("metrics")
    stack: Stack = stack_factory(
        REFUNDQ_API_KEYS=stored.line(), REFUNDQ_POLL_SCHEDULE_SECONDS="[0.5]"
    )
    stack.start_worker()
    stack.start_api()
    http = shop_client(stack, key)

    def refund(ref: str, **body: Any) -> str:
        answer = http.post(
            "/v1/refunds", json=refund_body(ref, **body), headers={"Idempotency-Key": unique("m")}
        )
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    plain = [refund(order(stack)) for _ in range(2)]
    limited_ref = order(stack)
    stack.sandbox.fault("vai247", "refund", "rate_limit", times=1, payment_ref=limited_ref)
    limited = refund(limited_ref)
    dropped_ref = order(stack)
    stack.sandbox.fault("vai247", "refund", "apply_then_drop", times=1, payment_ref=dropped_ref)
    dropped = refund(dropped_ref)
    vaultspay_ref = unique("PL")
    stack.sandbox.create_payment("vaultspay", vaultspay_ref, "80.00", "AED")
    awaiting = http.post(
        "/v1/refunds",
        json={
            "provider": "vaultspay",
            "payment_ref": vaultspay_ref,
            "amount": "80.00",
            "currency": "AED",
        },
        headers={"Idempotency-Key": unique("m")},
    ).json()["id"]
    for job_id in [*plain, limited]:
        assert wait_final(http, job_id)["status"] == "succeeded"
    assert wait_final(http, dropped)["status"] == "unknown"
    stack.wait_status(awaiting, {"awaiting_gateway", *FINAL})
    with read_session() as session:
        calls = session.execute(
            select(Job.provider, Attempt.duration_ms)
            .join(Job, Job.id == Attempt.job_id)
            .where(Attempt.state == "done")
        ).all()
    vai247_calls = [ms for provider, ms in calls if provider == "vai247"]
    assert len(vai247_calls) == 5  # two plain, 429 + retry, the dropped one

    # The counters trail the database by a few seconds (rows must be old enough that no
    # earlier transaction can still commit): wait for them to catch up.
    def caught_up() -> dict | None:
        samples = scrape(stack)
        counted = sum(
            v
            for (name, labels), v in samples.items()
            if name == "refundq_gateway_call_duration_seconds_count"
            and ("provider", "vai247") in labels
        )
        backlog = value(samples, "refundq_poll_backlog")
        retries = value(samples, "refundq_retries_total", provider="vai247")
        return samples if counted == 5 and backlog == 1 and retries == 1 else None

    samples = wait_for(caught_up, timeout=30, message="the metrics to count every call")

    assert value(samples, "refundq_database_up") == 1
    assert value(samples, "refundq_jobs", provider="vai247", status="succeeded") == 3
    assert value(samples, "refundq_jobs", provider="vai247", status="unknown") == 1
    assert value(samples, "refundq_jobs", provider="vaultspay", status="awaiting_gateway") == 1
    assert value(samples, "refundq_jobs", provider="pgv2", status="queued") == 0  # all series
    assert value(samples, "refundq_unknown_jobs", provider="vai247") == 1
    assert value(samples, "refundq_unknown_jobs", provider="bbmsl") == 0
    succeeded = value(
        samples,
        "refundq_gateway_call_duration_seconds_count",
        provider="vai247",
        outcome="succeeded",
    )
    assert succeeded == 3
    assert (
        value(
            samples,
            "refundq_gateway_call_duration_seconds_count",
            provider="vai247",
            outcome="rate_limited",
        )
        == 1
    )
    assert (
        value(
            samples,
            "refundq_gateway_call_duration_seconds_count",
            provider="vaultspay",
            outcome="pending",
        )
        == 1
    )
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "refundq_gateway_call_duration_seconds_bucket"
        and dict(labels)["provider"] == "vai247"
        and dict(labels)["outcome"] == "succeeded"
    )
    counts = [v for _le, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 3  # cumulative, +Inf = count
    total = sum(
        v
        for (name, labels), v in samples.items()
        if name == "refundq_gateway_call_duration_seconds_sum" and ("provider", "vai247") in labels
    )
    assert abs(total - sum(vai247_calls) / 1000) < 1e-6
    assert value(samples, "refundq_poll_backlog") == 1
    age = value(samples, "refundq_oldest_unfinished_job_age_seconds", status="awaiting_gateway")
    assert age is not None and age > 0
    assert value(samples, "refundq_oldest_unfinished_job_age_seconds", status="queued") == 0
    unknown_age = value(samples, "refundq_oldest_unfinished_job_age_seconds", status="unknown")
    assert unknown_age is not None and unknown_age > 0

    # Counters never count a row twice, however often they are scraped.
    again = scrape(stack)
    assert value(again, "refundq_retries_total", provider="vai247") == 1
    assert (
        value(
            again,
            "refundq_gateway_call_duration_seconds_count",
            provider="vai247",
            outcome="succeeded",
        )
        == 3
    )
