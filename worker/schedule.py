"""Celery beat's schedule. Every entry has `expires` ≤ its interval, so a beat that falls behind
(or a worker that was down) does not release a pile of stale ticks at once (celery/celery#591).
Every entry is also safe to run twice at the same moment: the tasks claim rows, they do not
trust the schedule (two beats by mistake do no harm)."""

from __future__ import annotations

from typing import Any

from worker.settings import Settings

DAY = 24 * 3600.0


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    def every(seconds: float, task: str) -> dict[str, Any]:
        return {"task": task, "schedule": seconds, "options": {"expires": seconds}}

    schedule = {
        "dispatch-queued": every(settings.dispatch_interval_seconds, "refundq.dispatch_queued"),
        "reap-expired": every(settings.reap_interval_seconds, "refundq.reap_expired"),
        "poll-pending": every(settings.poll_interval_seconds, "refundq.poll_pending"),
        "reconcile-daily": every(settings.reconcile_interval_seconds, "refundq.reconcile"),
        # Notifications to shops whose message was lost or whose wait outlived a countdown.
        "dispatch-notifications": every(
            settings.notify_sweep_interval_seconds, "refundq.dispatch_notifications"
        ),
    }
    if settings.database_url.startswith("sqlite"):
        # SQLite's write-ahead log, copied into the database here rather than by a job's commit
        # (worker/db.py, WAL_AUTOCHECKPOINT_PAGES).
        schedule["checkpoint-wal"] = every(
            settings.checkpoint_interval_seconds, "refundq.checkpoint"
        )
    return schedule
