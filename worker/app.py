"""The Celery app: `celery -A worker.app worker` / `celery -A worker.app beat`.

Settings chosen on purpose (CELERY_NOTES.md has the sources):
* `task_acks_late` + `task_reject_on_worker_lost` + prefetch 1: a message is acknowledged only
  after its task ran, and one a dead worker held goes back to the queue. Redelivery is harmless
  because the database claim, not the broker, decides who works on a job (rule 2).
* Visibility timeout 3600 s, set in the three places Celery reads it (celery/celery#7651): Redis
  redelivers an unacknowledged message after it, including countdown messages waiting in a
  worker, so it must exceed the longest countdown we hand Celery (`max_countdown_seconds`, 300 s)
  plus the task time limit. Nothing relies on it for recovery — the reaper and the dispatcher
  find stuck jobs in seconds from the database — so it errs on the long side to avoid duplicate
  deliveries rather than to speed anything up.
* A hard time limit below the lease (`Settings` checks it), so a worker that still runs never
  loses its lease to the reaper mid-call.
* Task events on, with readable names and a job id as the only argument, so Flower shows what
  runs without seeing credentials or customer data (rule 9).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.signals import celeryd_after_setup, setup_logging, worker_process_init

from worker import beat, broker  # noqa: F401 - beat connects how beat stops (worker/beat.py)
from worker.schedule import beat_schedule
from worker.settings import Settings, get_settings

VISIBILITY_TIMEOUT_SECONDS = 3600
QUEUE = "refundq"
EXECUTE_JOB = "refundq.execute_job"
POLL_JOB = "refundq.poll_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS}
    return {
        "broker_url": settings.broker_url,
        # kombu's Redis transport with one client per channel, not one per command
        # (worker/broker.py); only for plain redis://, see there.
        "broker_transport": broker.TRANSPORT
        if urlsplit(settings.broker_url).scheme == "redis"
        else None,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
        "broker_connection_retry_on_startup": True,
        # A producer whose broker is down must not hang: the job is committed, the dispatcher
        # publishes it later.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_seconds,
        "task_soft_time_limit": settings.task_time_limit_seconds * 0.9,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "task_default_queue": QUEUE,
        "worker_soft_shutdown_timeout": 30.0,
        "worker_hijack_root_logger": False,
        "beat_schedule": beat_schedule(settings),
        # In memory, and stopped between ticks rather than under one (worker/beat.py).
        "beat_scheduler": "worker.beat:Scheduler",
    }


app = Celery("refundq", include=["tasks"])
app.conf.update(celery_config(get_settings()))


def configure(settings: Settings | None = None) -> None:
    """Re-read settings into the app (tests that switch broker or database mid-process)."""
    import kombu.pools

    settings = settings or get_settings()
    app.conf.update(celery_config(settings))
    # Connection and producer pools are cached in three places; drop them all so the next
    # publish connects to the broker now configured.
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    kombu.pools.reset()


# Every message refundq publishes says when (epoch seconds): read off the oldest message still
# waiting in the queue, it tells the dispatcher which jobs' messages are in the queue's backlog.
PUBLISHED_AT_HEADER = "refundq_published_at"


def published_now() -> dict[str, float]:
    """The headers of a message published now."""
    return {PUBLISHED_AT_HEADER: time.time()}


def publish_job(job_id: str, countdown: float | None = None) -> None:
    """Publish `refundq.execute_job(job_id)`. Callers commit the job first, with
    `message_due_at` set to when this message is due (the dispatcher's yardstick)."""
    app.send_task(
        EXECUTE_JOB,
        args=[job_id],
        task_id=job_id,
        countdown=countdown,
        queue=QUEUE,
        headers=published_now(),
    )


def publish_poll(job_id: str) -> None:
    """Publish `refundq.poll_job(job_id)` (after the poll was claimed)."""
    app.send_task(POLL_JOB, args=[job_id], queue=QUEUE, headers=published_now())


# How far from the queue's oldest end to look for a message that carries its publish time
# (beat's own messages do not).
_BACKLOG_SCAN = 50


def oldest_waiting_published_at(settings: Settings | None = None) -> datetime | None:
    """When the oldest refundq message still waiting in the queue was published; None when the
    queue is empty (or holds nothing of ours near its oldest end, or cannot be read).

    Kombu's Redis transport LPUSHes messages onto a list named after the queue and workers BRPOP
    them: the oldest waiting message is at the list's tail. Read with a plain Redis client, like
    the rate limiter; any failure only means the dispatcher falls back to its plain rule."""
    import redis

    settings = settings or get_settings()
    try:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
        try:
            oldest_first = reversed(client.lrange(QUEUE, -_BACKLOG_SCAN, -1))
        finally:
            client.close()
    except (redis.RedisError, ValueError):
        return None
    for raw in oldest_first:
        try:
            published = float(json.loads(raw)["headers"][PUBLISHED_AT_HEADER])
        except (ValueError, KeyError, TypeError):
            continue
        return datetime.fromtimestamp(published, UTC)
    return None


@celeryd_after_setup.connect
def _rehearse(**_: Any) -> None:
    """In the worker's parent, once its logging is set up and before its pool forks: compile a
    job's statements once, for every pool process to inherit (worker/warmup.py)."""
    from worker import warmup

    warmup.rehearse()


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """Never use a database connection or an HTTP pool across fork (CELERY_NOTES.md 7); build
    this process's own before its first job (`gateways.warm`)."""
    from worker import db, gateways, notify  # noqa: F401 - notify: imported now, not in a turn

    db.reset_after_fork()
    gateways.reset()
    gateways.warm()


@setup_logging.connect
def _logging(**_: Any) -> None:
    """Celery's processes log as JSON lines like the rest of refundq (worker.logs)."""
    import os

    from worker.logs import configure_logging

    configure_logging(os.environ.get("REFUNDQ_LOG_LEVEL", "INFO"))
