"""Notifications to a shop's `notify_url`: signed, delivered once, retried through Celery after
failures, recovered by the beat sweep when their message is lost, and never a cause of change in
the job's own outcome. A real receiver on loopback checks every signature independently."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from itertools import pairwise

import httpx
import pytest
from sqlalchemy import select

from tests.api.support import (
    NOTIFY_SECRET,
    Receiver,
    order,
    refund_body,
    shop_client,
    verify_signature,
    wait_final,
)
from tests.support.polling import wait_for
from tests.support.services import free_port
from tests.support.stack import REPO, Stack, unique
from worker import engine, notify
from worker.apikeys import new_key
from worker.client import get_job_detail
from worker.db import read_session
from worker.models import Notification, NotificationDelivery


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def notifying_stack(stack_factory, **env: str) -> tuple[Stack, httpx.Client]:
    """A stack of its own (worker, beat, API) that signs notifications; fast retries."""
    key, stored = new_key("notified-shop")
    settings = {
        "REFUNDQ_API_KEYS": stored.line(),
        "REFUNDQ_NOTIFY_SECRET": NOTIFY_SECRET,
        "REFUNDQ_NOTIFY_RETRY_SCHEDULE_SECONDS": "[0.3]",
        "REFUNDQ_NOTIFY_SWEEP_INTERVAL_SECONDS": "0.5",
        **env,
    }
    stack: Stack = stack_factory(**settings)
    stack.start_worker()
    stack.start_beat()
    stack.start_api()
    return stack, shop_client(stack, key)


def refund_notified(stack: Stack, http: httpx.Client, url: str) -> str:
    ref = order(stack)
    answer = http.post(
        "/v1/refunds",
        json=refund_body(ref, notify_url=url),
        headers={"Idempotency-Key": unique("n")},
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def notifications_of(job_id: str) -> list[Notification]:
    with read_session() as session:
        return list(
            session.execute(
                select(Notification).where(Notification.job_id == job_id).order_by(Notification.id)
            ).scalars()
        )


def deliveries_of(notification_id: int) -> list[NotificationDelivery]:
    with read_session() as session:
        return list(
            session.execute(
                select(NotificationDelivery)
                .where(NotificationDelivery.notification_id == notification_id)
                .order_by(NotificationDelivery.number)
            ).scalars()
        )


def test_a_settled_job_is_notified_once_with_a_valid_signature(stack_factory, receiver):
    stack, http = notifying_stack(stack_factory)
    job_id = refund_notified(stack, http, receiver.url)
    quiet_id = refund_notified(stack, http, "")  # no notify_url: nothing to send

    done = wait_final(http, job_id)
    [received] = receiver.wait(1)

    assert done["status"] == "succeeded"
    assert wait_final(http, quiet_id)["status"] == "succeeded"
    assert received.path == "/refundq/notifications"
    assert received.headers["Content-Type"] == "application/json"
    assert verify_signature(NOTIFY_SECRET, received.headers["Refundq-Signature"], received.body)
    assert not verify_signature(
        "another-secret", received.headers["Refundq-Signature"], received.body
    )
    sent = json.loads(received.body)
    assert sent == http.get(f"/v1/jobs/{job_id}").json()  # the job view, amounts as strings
    assert (sent["status"], sent["amount"]) == ("succeeded", "50.00")
    assert received.headers["Refundq-Job-Id"] == job_id
    [recorded] = notifications_of(job_id)
    assert received.headers["Refundq-Notification-Id"] == str(recorded.id)
    wait_for(
        lambda: notifications_of(job_id)[0].state == "delivered",
        timeout=10,
        message="the delivery to be recorded",
    )
    [delivery] = deliveries_of(recorded.id)
    assert (delivery.outcome, delivery.http_status, delivery.number) == ("delivered", 200, 1)
    assert notifications_of(quiet_id) == []

    # on_settled may run again for the same transition (a reaper, a retried task): nothing new.
    engine.on_settled(job_id)
    engine.on_settled(job_id)
    assert len(notifications_of(job_id)) == 1
    assert notify.dispatch_due(publish=lambda *_: pytest.fail("nothing is due")) == 0
    assert len(receiver.received()) == 1


def test_a_notification_is_retried_with_backoff_after_the_receiver_answers_500(
    stack_factory, receiver
):
    stack, http = notifying_stack(stack_factory)
    receiver.answers = [500, 503]

    job_id = refund_notified(stack, http, receiver.url)
    received = receiver.wait(3)

    assert wait_final(http, job_id)["status"] == "succeeded"
    assert all(
        verify_signature(NOTIFY_SECRET, r.headers["Refundq-Signature"], r.body) for r in received
    )
    assert len({r.body for r in received}) == 1  # the same notice every time
    assert [r.headers["Refundq-Delivery-Attempt"] for r in received] == ["1", "2", "3"]
    assert len({r.headers["Refundq-Notification-Id"] for r in received}) == 1
    gaps = [b.at - a.at for a, b in pairwise(received)]
    assert min(gaps) >= 0.25, gaps  # the schedule's 0.3 s backoff, not an immediate resend
    [recorded] = notifications_of(job_id)
    wait_for(
        lambda: notifications_of(job_id)[0].state == "delivered",
        timeout=10,
        message="the third delivery to be recorded",
    )
    assert [(d.outcome, d.http_status) for d in deliveries_of(recorded.id)] == [
        ("rejected", 500),
        ("rejected", 503),
        ("delivered", 200),
    ]
    assert "HTTP 500" in (deliveries_of(recorded.id)[0].error or "")
    assert len(receiver.received()) == 3


def test_a_receiver_that_is_down_never_changes_the_jobs_outcome(stack_factory):
    stack, http = notifying_stack(stack_factory, REFUNDQ_NOTIFY_MAX_ATTEMPTS="3")
    nobody = f"http://127.0.0.1:{free_port()}/hook"

    job_id = refund_notified(stack, http, nobody)
    done = wait_final(http, job_id)
    wait_for(
        lambda: (found := notifications_of(job_id)) and found[0].state == "failed",
        timeout=30,
        message="the notification to give up after 3 attempts",
    )

    [recorded] = notifications_of(job_id)
    deliveries = deliveries_of(recorded.id)
    assert [d.outcome for d in deliveries] == ["unreachable"] * 3
    assert all("ConnectError" in (d.error or "") for d in deliveries)
    assert done["status"] == "succeeded"
    assert http.get(f"/v1/jobs/{job_id}").json() == done  # not a field changed, not a timestamp
    history = get_job_detail(job_id).events
    assert history[-1].to_status == "succeeded"
    assert len(stack.sandbox.ledger("vai247", done["payment_ref"])) == 1


def test_a_notification_whose_message_never_reached_the_broker_is_sent_by_the_sweep(
    stack_factory, receiver
):
    stack, http = notifying_stack(stack_factory)
    ref = order(stack)
    stack.sandbox.fault("vai247", "refund", "apply_then_drop", times=1, payment_ref=ref)
    answer = http.post(
        "/v1/refunds",
        json=refund_body(ref, notify_url=receiver.url),
        headers={"Idempotency-Key": unique("n")},
    )
    job_id = answer.json()["id"]
    assert wait_final(http, job_id)["status"] == "unknown"
    [told_unknown] = receiver.wait(1)
    assert json.loads(told_unknown.body)["status"] == "unknown"

    # An operator resolves the job from a shell whose broker is down: the notification is
    # recorded, its message cannot be published, and the beat's sweep sends it.
    env = stack.child_env(REFUNDQ_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    resolved = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "resolve",
            job_id,
            "--as",
            "succeeded",
            "--note",
            "seen in the vai247 portal",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resolved.returncode == 0, resolved.stderr

    told_succeeded = receiver.wait(2)[1]
    assert json.loads(told_succeeded.body)["status"] == "succeeded"
    assert verify_signature(
        NOTIFY_SECRET, told_succeeded.headers["Refundq-Signature"], told_succeeded.body
    )
    assert [n.job_status for n in notifications_of(job_id)] == ["unknown", "succeeded"]
    assert len(stack.sandbox.ledger("vai247", ref)) == 1
