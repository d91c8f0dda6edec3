"""vaultspay settles days later: polls, callbacks, two beats, reconciliation, operators.

Through Redis, prefork workers, beat, the HTTP API (callbacks) and the sandbox, on SQLite and
PostgreSQL. Poll counts come from the sandbox's call log (what the gateway really saw)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select

from tests.support.polling import wait_for
from tests.support.stack import REPO, Stack, unique
from worker import gateways
from worker.client import enqueue_refund, get_job, get_job_detail
from worker.db import read_session
from worker.models import Attempt, Event

FINAL = {"succeeded", "declined", "failed", "unknown"}


@pytest.fixture(scope="module")
def settling(running: Stack) -> Iterator[Stack]:
    """The module's stack, with the HTTP API up for callbacks."""
    running.start_api()
    yield running


def awaiting(stack: Stack, amount: str = "80.00") -> tuple[str, str, str]:
    """A vaultspay refund accepted by the gateway: (job id, transaction ref, RFRQ uuid)."""
    ref = unique("PL")
    stack.sandbox.create_payment("vaultspay", ref, amount, "AED")
    job = enqueue_refund(
        provider="vaultspay",
        payment_ref=ref,
        amount=amount,
        currency="AED",
        idempotency_key=unique("k"),
    )
    view = stack.wait_status(job.id, {"awaiting_gateway", *FINAL})
    assert view.status == "awaiting_gateway", view
    return job.id, ref, view.provider_reference


def set_status(stack: Stack, uuid: str, status: int) -> None:
    stack.sandbox.post(f"/vaultspay/refund-requests/{uuid}/status", {"status": status})


def status_calls(stack: Stack, uuid: str) -> int:
    return len(stack.sandbox.calls("vaultspay", "status", key=uuid))


@pytest.mark.parametrize(
    ("final", "status", "code"),
    [
        (2, "succeeded", None),
        (4, "declined", "VAULTSPAY_REJECTED"),
        (3, "declined", "VAULTSPAY_CANCELLED"),
    ],
)
def test_a_vaultspay_refund_follows_the_gateway_0_1_to_its_final_status(
    settling: Stack, final: int, status: str, code: str | None
):
    job_id, _ref, uuid = awaiting(settling)
    wait_for(lambda: status_calls(settling, uuid) >= 1, timeout=20, message="a first poll")
    set_status(settling, uuid, 1)
    polled = status_calls(settling, uuid)
    wait_for(lambda: status_calls(settling, uuid) > polled, timeout=20, message="a poll at 1")
    # The worker records the answer a moment after the gateway logged the call.
    wait_for(
        lambda: (get_job(job_id).raw_status or "").startswith("1"),
        timeout=10,
        message="the poll's answer to be recorded",
    )
    assert get_job(job_id).status == "awaiting_gateway"

    set_status(settling, uuid, final)

    done = settling.wait_status(job_id, FINAL, timeout=30)
    assert done.status == status
    if code:
        assert done.last_error.code == code
    polls = [a for a in get_job_detail(job_id).attempt_log if a.purpose == "poll"]
    assert polls and all(p.state == "done" for p in polls)


def test_a_callback_settles_the_job_within_seconds_confirmed_by_a_status_call(
    stack_factory,
):
    # Polls are an hour apart here: only the callback can settle the job in time.
    stack: Stack = stack_factory(REFUNDQ_POLL_SCHEDULE_SECONDS="[3600]")
    stack.start(api=True)
    job_id, _ref, uuid = awaiting(stack)
    request = stack.sandbox.get(f"/vaultspay/refund-requests/{uuid}")
    assert request["callback_url"].startswith(stack.api_url + "/webhooks/vaultspay/")
    assert status_calls(stack, uuid) == 0

    set_status(stack, uuid, 2)  # the sandbox POSTs the documented callback

    done = stack.wait_status(job_id, FINAL, timeout=5)
    assert done.status == "succeeded"
    assert status_calls(stack, uuid) == 1  # confirmed with get-refund-request
    with read_session() as session:
        callbacks = (
            session.execute(
                select(Event.detail).where(Event.job_id == job_id, Event.kind == "callback")
            )
            .scalars()
            .all()
        )
    assert callbacks == [
        {
            "status": "SUCCESS",
            "amount": "80.00",
            "fee": "0",
            "vat": "0",
            "vp_transaction_id": callbacks[0]["vp_transaction_id"],
        }
    ]

    # A late duplicate of the same callback changes nothing and is recorded once.
    stack.sandbox.post(f"/vaultspay/refund-requests/{uuid}/callback", {})
    wait_for(
        lambda: len(stack.sandbox.calls("vaultspay", "callback", key=uuid)) >= 2,
        timeout=10,
        message="the redelivered callback",
    )
    assert get_job(job_id).status == "succeeded"
    with read_session() as session:
        count = session.execute(
            select(func.count())
            .select_from(Event)
            .where(Event.job_id == job_id, Event.kind == "callback")
        ).scalar_one()
    assert count == 1


def test_forged_callbacks_change_nothing(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_POLL_SCHEDULE_SECONDS="[3600]")
    stack.start(api=True)
    job_id, _ref, uuid = awaiting(stack)
    other_id, _other_ref, _other_uuid = awaiting(stack)
    body = {
        "vpTransactionId": "RF_X",
        "clientReference": uuid,
        "amount": "80.00",
        "fee": "0",
        "vat": "0",
        "status": "SUCCESS",
        "referenceId": uuid,
    }
    good_token = gateways.callback_token(job_id)

    def post(token: str, payload: dict) -> httpx.Response:
        return httpx.post(f"{stack.api_url}/webhooks/vaultspay/{token}", json=payload, timeout=10)

    assert post(f"{job_id}.{'0' * 32}", body).status_code == 401  # wrong token
    assert post("nothing", body).status_code == 401
    unknown_ref = {**body, "referenceId": "RFRQ_NOT_OURS"}
    assert post(good_token, unknown_ref).status_code == 404  # unknown referenceId
    # A token for another job cannot settle this one.
    assert post(gateways.callback_token(other_id), body).status_code == 404
    assert post(good_token, {"not": "a callback"}).status_code == 422

    # A valid token and reference, but the gateway still says pending: confirmed, unchanged.
    answer = post(good_token, body)
    assert answer.status_code == 200 and answer.json()["confirming"] is True
    wait_for(lambda: status_calls(stack, uuid) == 1, timeout=10, message="the confirmation")
    wait_for(
        lambda: [
            a
            for a in get_job_detail(job_id).attempt_log
            if a.purpose == "poll" and a.state == "done"
        ],
        timeout=10,
        message="the confirming poll to finish",
    )
    assert get_job(job_id).status == "awaiting_gateway"
    assert get_job(other_id).status == "awaiting_gateway"


def test_two_beats_poll_each_due_job_once_per_due_time(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_POLL_SCHEDULE_SECONDS="[1]")
    stack.start_worker(concurrency=4)
    stack.start_beat("beat-a")
    stack.start_beat("beat-b")
    jobs_and_uuids = [awaiting(stack) for _ in range(4)]
    # Let both beats tick (every 0.5 s) through several due times (every 1 s).
    wait_for(
        lambda: all(status_calls(stack, u) >= 4 for _j, _r, u in jobs_and_uuids),
        timeout=30,
        message="four polls of every job",
    )
    stack.stop_all()

    for job_id, _ref, uuid in jobs_and_uuids:
        with read_session() as session:
            polls = (
                session.execute(
                    select(Attempt.started_at)
                    .where(Attempt.job_id == job_id, Attempt.purpose == "poll")
                    .order_by(Attempt.started_at)
                )
                .scalars()
                .all()
            )
        # Every poll the gateway saw was claimed once: as many calls as claimed polls. And no
        # due time was polled twice: one poll per due interval (1 s), not two. (A poll's start
        # includes its queueing delay, so single gaps can be short; the rate cannot double.)
        assert status_calls(stack, uuid) == len(polls)
        span = (polls[-1] - polls[0]).total_seconds()
        assert len(polls) <= span / 1.0 + 2, (len(polls), span)


def test_a_tick_polls_exactly_the_due_jobs_among_thousands_using_the_index(stack_factory):
    from datetime import timedelta

    from worker import engine, jobs
    from worker.clock import utcnow
    from worker.db import get_engine, write_session
    from worker.models import Job

    stack_factory()  # a database of its own: the counts below are exact
    now = utcnow()
    with write_session() as session:
        for i in range(5000):
            due = i < 20
            session.add(
                Job(
                    id=f"{i:032x}",
                    kind="refund",
                    provider="vaultspay",
                    payment_ref=f"PL_{i}",
                    amount_minor=1000,
                    currency="AED",
                    extras={},
                    idempotency_key=f"bulk-{i}",
                    fingerprint="x",
                    status="awaiting_gateway",
                    provider_reference=f"RFRQ_{i}",
                    next_poll_at=now - timedelta(seconds=1) if due else now + timedelta(hours=1),
                    poll_deadline_at=now + timedelta(days=7),
                    created_at=now,
                    updated_at=now,
                )
            )
        # Final jobs of the past carry no poll time at all.
        for i in range(5000, 7000):
            session.add(
                Job(
                    id=f"{i:032x}",
                    kind="refund",
                    provider="vaultspay",
                    payment_ref=f"PL_{i}",
                    amount_minor=1000,
                    currency="AED",
                    extras={},
                    idempotency_key=f"bulk-{i}",
                    fingerprint="x",
                    status="succeeded",
                    created_at=now,
                    updated_at=now,
                )
            )
    published: list[str] = []

    counts = engine.poll_pending(publish_poll=published.append)

    assert counts == {"polled": 20, "expired": 0}
    assert sorted(published) == [f"{i:032x}" for i in range(20)]
    assert engine.poll_pending(publish_poll=published.append) == {"polled": 0, "expired": 0}

    # The due query is served by the partial index on next_poll_at.
    database = get_engine()
    with database.connect() as connection:
        if database.dialect.name == "sqlite":
            plan = " ".join(
                str(row[-1])
                for row in connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE next_poll_at IS NOT NULL "
                    "AND next_poll_at <= '2100-01-01' ORDER BY next_poll_at LIMIT 200"
                )
            )
        else:
            connection.exec_driver_sql("ANALYZE jobs")
            plan = " ".join(
                str(row[0])
                for row in connection.exec_driver_sql(
                    "EXPLAIN SELECT id FROM jobs WHERE next_poll_at IS NOT NULL "
                    "AND next_poll_at <= now() ORDER BY next_poll_at LIMIT 200"
                )
            )
    print(f"\n{database.dialect.name} plan for the due-poll query: {plan}")
    assert "ix_jobs_next_poll_due" in plan
    assert jobs.due_polls(utcnow(), 200) == []


def test_a_refund_that_never_settles_becomes_unknown_at_its_deadline(stack_factory):
    stack: Stack = stack_factory(
        REFUNDQ_POLL_DEADLINE_SECONDS="3", REFUNDQ_POLL_SCHEDULE_SECONDS="[0.5]"
    )
    stack.start()
    job_id, _ref, _uuid = awaiting(stack)
    done = stack.wait_status(job_id, FINAL, timeout=30)
    assert done.status == "unknown"
    assert done.last_error.message == "gateway did not settle in time"


# ---- reconciliation and operators ------------------------------------------------------------


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO,
        env=stack.child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_reconciliation_fixes_planted_mismatches_and_lists_what_it_cannot(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_POLL_SCHEDULE_SECONDS="[3600]")
    stack.start()
    # 1. A vaultspay job we hold as awaiting, which the gateway settled (callback lost).
    settled_id, _ref, uuid = awaiting(stack)
    set_status(stack, uuid, 2)
    # 2. An unknown bbmsl job whose order shows REFUNDED (the answer was lost on the way back).
    bbmsl_ref = unique("bbmsl")
    stack.sandbox.create_payment("bbmsl", bbmsl_ref, "45.00", "HKD")
    stack.sandbox.fault("bbmsl", "refund", "apply_then_drop", times=1, payment_ref=bbmsl_ref)
    stack.sandbox.fault("bbmsl", "query", "error", status=500, times=10, payment_ref=bbmsl_ref)
    bbmsl_job = enqueue_refund(
        provider="bbmsl",
        payment_ref=bbmsl_ref,
        amount="45.00",
        currency="HKD",
        idempotency_key=unique("k"),
    )
    assert stack.wait_status(bbmsl_job.id, FINAL, timeout=60).status == "unknown"
    stack.sandbox.clear_faults()
    # 3. An unknown vai247 job: vai247 cannot be asked. A human must look.
    vai_ref = unique("ord")
    stack.sandbox.create_payment("vai247", vai_ref, "30.00", "USD")
    stack.sandbox.fault("vai247", "refund", "apply_then_drop", times=1, payment_ref=vai_ref)
    vai_job = enqueue_refund(
        provider="vai247",
        payment_ref=vai_ref,
        amount="30.00",
        currency="USD",
        idempotency_key=unique("k"),
    )
    assert stack.wait_status(vai_job.id, FINAL).status == "unknown"

    result = cli(stack, "reconcile", "--json", "--report", str(stack.workdir / "report.json"))

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert json.loads((stack.workdir / "report.json").read_text()) == report
    corrected = {f["job_id"]: f for f in report["corrected"]}
    assert corrected[settled_id]["held"] == "awaiting_gateway"
    assert corrected[settled_id]["now"] == "succeeded"
    assert corrected[bbmsl_job.id]["held"] == "unknown"
    assert corrected[bbmsl_job.id]["now"] == "succeeded"
    human = {f["job_id"]: f for f in report["needs_human"]}
    assert vai_job.id in human and "cannot be asked" in human[vai_job.id]["why"]
    assert get_job(settled_id).status == "succeeded"
    assert get_job(bbmsl_job.id).status == "succeeded"
    assert get_job(vai_job.id).status == "unknown"
    assert report["counts"]["vai247"]["unknown"] == 1
    events = get_job_detail(bbmsl_job.id).events
    assert events[-1].kind == "reconciled" and events[-1].actor == "reconcile"
    # The ledger agrees with what reconciliation concluded: one refund, no more.
    assert len(stack.sandbox.ledger("bbmsl", bbmsl_ref)) == 1

    table = cli(stack, "reconcile")
    assert table.returncode == 0
    assert "needs a human (1)" in table.stdout and vai_job.id in table.stdout


def test_operators_retry_failed_jobs_and_resolve_unknown_ones_with_who_and_why(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_VAI247_BASE_URL="http://127.0.0.1:9")
    stack.start()
    # A job that never reached the gateway (nothing listens there): failed after its attempts.
    ref = unique("ord")
    stack.sandbox.create_payment("vai247", ref, "30.00", "USD")
    failed = enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="30.00",
        currency="USD",
        idempotency_key=unique("k"),
    )
    assert stack.wait_status(failed.id, FINAL, timeout=60).status == "failed"

    # The operator fixes the configuration (workers restarted), then re-drives the job.
    stack.stop_all()
    stack.extra_env["REFUNDQ_VAI247_BASE_URL"] = stack.sandbox_env["REFUNDQ_VAI247_BASE_URL"]
    retried_cli = cli(stack, "retry", failed.id, "--by", "ana")
    assert retried_cli.returncode == 0, retried_cli.stderr
    assert get_job(failed.id).status == "queued"
    stack.start()
    done = stack.wait_status(failed.id, FINAL, timeout=60)
    assert done.status == "succeeded"
    assert len(stack.sandbox.ledger("vai247", ref)) == 1
    retried = [e for e in get_job_detail(failed.id).events if e.actor == "operator:ana"]
    assert [(e.from_status, e.to_status) for e in retried] == [("failed", "queued")]

    unknown_ref = unique("ord")
    stack.sandbox.create_payment("vai247", unknown_ref, "30.00", "USD")
    stack.sandbox.fault("vai247", "refund", "apply_then_drop", times=1, payment_ref=unknown_ref)
    unknown = enqueue_refund(
        provider="vai247",
        payment_ref=unknown_ref,
        amount="30.00",
        currency="USD",
        idempotency_key=unique("k"),
    )
    assert stack.wait_status(unknown.id, FINAL).status == "unknown"
    # Refused while unknown without --force; resolve needs a note.
    refused = cli(stack, "retry", unknown.id)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert cli(stack, "resolve", unknown.id, "--as", "succeeded", "--note", "").returncode == 2
    resolved = cli(
        stack,
        "resolve",
        unknown.id,
        "--as",
        "succeeded",
        "--by",
        "ben",
        "--note",
        "seen in the vai247 merchant portal as ref_x",
    )
    assert resolved.returncode == 0, resolved.stderr
    view = get_job_detail(unknown.id)
    assert view.status == "succeeded"
    assert (view.events[-1].kind, view.events[-1].actor, view.events[-1].note) == (
        "resolved",
        "operator:ben",
        "seen in the vai247 merchant portal as ref_x",
    )
    assert cli(stack, "resolve", unknown.id, "--as", "declined", "--note", "x").returncode == 2
    # Forcing a retry of an unknown job warns that it may refund twice.
    other_ref = unique("ord")
    stack.sandbox.create_payment("vai247", other_ref, "30.00", "USD")
    stack.sandbox.fault("vai247", "refund", "drop", times=1, payment_ref=other_ref)
    other = enqueue_refund(
        provider="vai247",
        payment_ref=other_ref,
        amount="30.00",
        currency="USD",
        idempotency_key=unique("k"),
    )
    assert stack.wait_status(other.id, FINAL).status == "unknown"
    forced = cli(stack, "retry", other.id, "--force", "--note", "gateway confirmed: not seen")
    assert forced.returncode == 0
    assert "refunds 30.00 USD a second time" in " ".join(forced.stderr.split())
    assert stack.wait_status(other.id, FINAL).status == "succeeded"
    assert len(stack.sandbox.ledger("vai247", other_ref)) == 1
