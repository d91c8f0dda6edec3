"""The dispatcher behind a backlog (issue 7): messages that wait in a long queue are not lost,
and re-publishing them would only make the queue longer; messages that are gone are still
re-published. Real Redis and database, no worker: every message published stays in the queue
until the test looks. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from tests.support.polling import wait_for
from tests.support.stack import Stack
from worker import engine
from worker.app import QUEUE, app, oldest_waiting_published_at
from worker.clock import utcnow

REDISPATCH_AFTER = 0.3


def _queued(stack: Stack, count: int) -> list[str]:
    return [stack.refund_new_order() for _ in range(count)]


def _overdue() -> None:
    """Let every message published so far become `REDISPATCH_AFTER` overdue."""
    moment = utcnow()
    wait_for(
        lambda: utcnow() - moment > timedelta(seconds=REDISPATCH_AFTER * 1.5),
        timeout=10,
        interval=0.05,
        message="the redispatch delay to pass",
    )


def _dispatch() -> list[str]:
    published: list[str] = []
    engine.dispatch_queued(
        publish=lambda job_id, _countdown: published.append(job_id),
        waiting_since=oldest_waiting_published_at,
    )
    return published


def test_jobs_waiting_behind_a_backlog_are_not_published_again(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_REDISPATCH_AFTER_SECONDS=str(REDISPATCH_AFTER))
    app.send_task("refundq.reap_expired", queue=QUEUE)  # beat's: no publish time, oldest
    _queued(stack, 5)
    _overdue()

    assert _dispatch() == []
    assert stack.broker().llen(QUEUE) == 6


def test_messages_lost_before_the_backlog_are_published_again_and_only_those(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_REDISPATCH_AFTER_SECONDS=str(REDISPATCH_AFTER))
    lost = _queued(stack, 3)
    stack.redis.flushall()  # their messages are gone
    _overdue()
    waiting = _queued(stack, 2)  # published after: in the queue
    _overdue()

    republished = _dispatch()

    assert sorted(republished) == sorted(lost)
    assert not set(republished) & set(waiting)


def test_with_the_queue_empty_every_overdue_job_is_published_again(stack_factory):
    stack: Stack = stack_factory(REFUNDQ_REDISPATCH_AFTER_SECONDS=str(REDISPATCH_AFTER))
    ids = _queued(stack, 4)
    stack.redis.flushall()
    _overdue()

    assert oldest_waiting_published_at() is None
    assert sorted(_dispatch()) == sorted(ids)
