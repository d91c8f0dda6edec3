"""Prometheus metrics, computed from the database at scrape time (`GET /metrics` on the API).

The database is where every process records what it did — a worker's gateway calls (`attempts`),
every status change (`events`), the jobs themselves — so the API can show the workers' activity
without any worker exposing a port, and any number of API processes agree on every value. A
custom collector runs a few queries per scrape, each served by an index:

* gauges by status (`refundq_jobs`, `refundq_unknown_jobs`, the oldest unfinished job's age,
  `refundq_notifications`) are index-only scans of `ix_jobs_status_provider_created` and
  `ix_notifications_state_due`; `refundq_poll_backlog` reads the partial index on `next_poll_at`;
* the call-latency histogram and the retry counter are counters, so each process keeps running
  totals and adds, per scrape, only the rows past the last primary key it counted (a primary-key
  range: the cost follows what happened since the last scrape, not the size of the tables). The
  histogram's cumulative buckets are summed in SQL. An attempt row counts once it is `done`; the
  tally stops short of the oldest call still in flight, and of rows younger than a few seconds
  (on PostgreSQL a lower id may commit after a higher one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlmodel import col

import providers
from worker.clock import utcnow
from worker.db import read_session
from worker.logs import get_logger
from worker.models import (
    FINAL_STATUSES,
    Attempt,
    Event,
    Job,
    JobStatus,
    Notification,
    NotificationState,
)

log = get_logger("refundq.metrics")

# Gateway call latency buckets, in seconds: loopback sandboxes answer in milliseconds, real
# gateways in hundreds of them, and a timeout shows as the tens of seconds it took.
CALL_BUCKETS_SECONDS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Rows younger than this are left for the next scrape: on PostgreSQL a transaction holding a
# lower id may still commit after one holding a higher id.
COMMIT_LAG = timedelta(seconds=5)
# A call still `sending` after this long belongs to a worker that died (the reaper marks it
# abandoned); the tally no longer waits for it.
IN_FLIGHT_HORIZON = timedelta(minutes=10)
UNFINISHED_STATUSES = tuple(s for s in JobStatus if s not in FINAL_STATUSES)


@dataclass
class _CallTally:
    count: int = 0
    sum_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(CALL_BUCKETS_SECONDS))


@dataclass
class _Snapshot:
    jobs: dict[tuple[str, str], int]
    oldest: dict[str, datetime]
    poll_backlog: int
    notifications: dict[str, int]
    now: datetime


class DatabaseCollector(Collector):
    """Reads the metrics from the database on every scrape (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts_counted_through = 0
        self._events_counted_through = 0
        self._calls: dict[tuple[str, str], _CallTally] = {}
        self._retries: dict[str, int] = {}

    def describe(self) -> Iterable[Metric]:
        return []  # no query at registration; the names are fixed

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            with self._lock, read_session() as session:
                snapshot = _snapshot(session)
                self._tally_calls(session, snapshot.now)
                self._tally_retries(session, snapshot.now)
                calls = {
                    k: _CallTally(v.count, v.sum_ms, list(v.buckets))
                    for k, v in self._calls.items()
                }
                retries = dict(self._retries)
        except DBAPIError as exc:  # the scrape still answers, saying the database is down
            log.warning("metrics.database_down", error=f"{type(exc).__name__}: {exc}"[:300])
            yield GaugeMetricFamily(
                "refundq_database_up", "Whether the last scrape could read the database.", 0
            )
            return
        yield GaugeMetricFamily(
            "refundq_database_up", "Whether the last scrape could read the database.", 1
        )
        yield from _job_metrics(snapshot)
        yield _call_histogram(calls)
        retry_counter = CounterMetricFamily(
            "refundq_retries",
            "Gateway calls retried: every time a job was scheduled to try again (retry_wait).",
            labels=["provider"],
        )
        for provider in sorted(set(providers.provider_ids()) | set(retries)):
            retry_counter.add_metric([provider], retries.get(provider, 0))
        yield retry_counter
        yield GaugeMetricFamily(
            "refundq_metrics_scrape_seconds",
            "How long reading these metrics from the database took.",
            time.perf_counter() - started,
        )

    # Running totals: only rows past the last counted primary key are read.

    def _tally_calls(self, session: Session, now: datetime) -> None:
        above = self._attempts_counted_through
        through = session.execute(
            select(func.max(col(Attempt.id))).where(
                col(Attempt.id) > above, col(Attempt.started_at) < now - COMMIT_LAG
            )
        ).scalar_one_or_none()
        in_flight = session.execute(
            select(func.min(col(Attempt.id))).where(
                col(Attempt.id) > above,
                col(Attempt.state) == "sending",
                col(Attempt.started_at) >= now - IN_FLIGHT_HORIZON,
            )
        ).scalar_one_or_none()
        if in_flight is not None and through is not None:
            through = min(through, in_flight - 1)
        if through is None or through <= above:
            return
        duration = col(Attempt.duration_ms)
        rows = session.execute(
            select(
                col(Job.provider),
                col(Attempt.outcome_class),
                func.count(),
                func.sum(duration),
                *[
                    func.sum(case((duration <= bound * 1000, 1), else_=0))
                    for bound in CALL_BUCKETS_SECONDS
                ],
            )
            .select_from(Attempt)
            .join(Job, col(Job.id) == col(Attempt.job_id))
            .where(
                col(Attempt.id) > above,
                col(Attempt.id) <= through,
                col(Attempt.state) == "done",
                duration.is_not(None),
            )
            .group_by(col(Job.provider), col(Attempt.outcome_class))
        ).all()
        for provider, outcome, count, sum_ms, *buckets in rows:
            tally = self._calls.setdefault((provider, outcome or "none"), _CallTally())
            tally.count += int(count)
            tally.sum_ms += float(sum_ms or 0.0)
            for index, in_bucket in enumerate(buckets):
                tally.buckets[index] += int(in_bucket or 0)
        self._attempts_counted_through = through

    def _tally_retries(self, session: Session, now: datetime) -> None:
        above = self._events_counted_through
        through = session.execute(
            select(func.max(col(Event.id))).where(
                col(Event.id) > above, col(Event.at) < now - COMMIT_LAG
            )
        ).scalar_one_or_none()
        if through is None or through <= above:
            return
        rows = session.execute(
            select(col(Job.provider), func.count())
            .select_from(Event)
            .join(Job, col(Job.id) == col(Event.job_id))
            .where(
                col(Event.id) > above,
                col(Event.id) <= through,
                col(Event.to_status) == JobStatus.RETRY_WAIT.value,
            )
            .group_by(col(Job.provider))
        ).all()
        for provider, count in rows:
            self._retries[provider] = self._retries.get(provider, 0) + int(count)
        self._events_counted_through = through


def _snapshot(session: Session) -> _Snapshot:
    now = utcnow()
    jobs = {
        (status, provider): int(count)
        for status, provider, count in session.execute(
            select(col(Job.status), col(Job.provider), func.count()).group_by(
                col(Job.status), col(Job.provider)
            )
        ).all()
    }
    oldest = {
        status: created
        for status, created in session.execute(
            select(col(Job.status), func.min(col(Job.created_at)))
            .where(col(Job.status).in_([s.value for s in UNFINISHED_STATUSES]))
            .group_by(col(Job.status))
        ).all()
        if created is not None
    }
    backlog = session.execute(
        select(func.count())
        .select_from(Job)
        .where(col(Job.next_poll_at).is_not(None), col(Job.next_poll_at) <= now)
    ).scalar_one()
    notifications = {
        state: int(count)
        for state, count in session.execute(
            select(col(Notification.state), func.count()).group_by(col(Notification.state))
        ).all()
    }
    return _Snapshot(jobs, oldest, int(backlog), notifications, now)


def _job_metrics(snapshot: _Snapshot) -> Iterator[Metric]:
    known = set(providers.provider_ids()) | {provider for _s, provider in snapshot.jobs}
    jobs = GaugeMetricFamily(
        "refundq_jobs", "Jobs by provider and status.", labels=["provider", "status"]
    )
    unknown = GaugeMetricFamily(
        "refundq_unknown_jobs",
        "Jobs in `unknown`: the gateway may have acted and cannot tell; a human or "
        "reconciliation must decide.",
        labels=["provider"],
    )
    for provider in sorted(known):
        for status in JobStatus:
            jobs.add_metric(
                [provider, status.value], snapshot.jobs.get((status.value, provider), 0)
            )
        unknown.add_metric([provider], snapshot.jobs.get((JobStatus.UNKNOWN.value, provider), 0))
    yield jobs
    yield unknown
    yield GaugeMetricFamily(
        "refundq_poll_backlog",
        "Jobs awaiting the gateway whose status poll is due and not yet claimed.",
        snapshot.poll_backlog,
    )
    oldest = GaugeMetricFamily(
        "refundq_oldest_unfinished_job_age_seconds",
        "Age of the oldest job in each status that is not final (0 when there is none); "
        "max() over the statuses is the oldest job not yet final.",
        labels=["status"],
    )
    for status in UNFINISHED_STATUSES:
        created = snapshot.oldest.get(status.value)
        age = (snapshot.now - created).total_seconds() if created is not None else 0.0
        oldest.add_metric([status.value], max(0.0, age))
    yield oldest
    notifications = GaugeMetricFamily(
        "refundq_notifications", "Notifications to shops by delivery state.", labels=["state"]
    )
    for state in NotificationState:
        notifications.add_metric([state.value], snapshot.notifications.get(state.value, 0))
    yield notifications


def _call_histogram(calls: dict[tuple[str, str], _CallTally]) -> Metric:
    histogram = HistogramMetricFamily(
        "refundq_gateway_call_duration_seconds",
        "Gateway calls (sends, status checks, polls) by provider and outcome class, as the "
        "workers recorded them.",
        labels=["provider", "outcome"],
    )
    for (provider, outcome), tally in sorted(calls.items()):
        buckets: list[tuple[str, Any]] = [
            (floatToGoString(bound), in_bucket)
            for bound, in_bucket in zip(CALL_BUCKETS_SECONDS, tally.buckets, strict=True)
        ]
        buckets.append(("+Inf", tally.count))
        histogram.add_metric([provider, outcome], buckets, sum_value=tally.sum_ms / 1000)
    return histogram


def make_registry() -> CollectorRegistry:
    """A registry holding refundq's database collector (one per API process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    return registry
