"""Celery beat's scheduler, and how beat stops.

refundq's schedule comes from code (worker/schedule.py), so the scheduler keeps it in memory: no
shelve file to corrupt (celery/celery#4777), and none for a stop to close under a tick still
reading it (a beat stopped that way exited 1, "invalid operation on closed shelf"). The cost:
after a restart each interval counts from the restart.

Stopping: Celery's own SIGTERM/SIGINT handler (`celery.apps.beat.Beat.install_sync_handler`)
closes the scheduler's broker connection inside the signal handler and then raises
`SystemExit`. When the signal lands while a tick is publishing, redis-py is blocked reading the
reply on that very connection: closing it makes redis-py's cleanup fail with "I/O operation on
closed file", that `ValueError` replaces the `SystemExit`, and `Scheduler.apply_entry` logs it
("Couldn't apply scheduled task") and carries on. Beat then ticks until its supervisor gives
up and SIGKILLs it (honcho after 5 s, Docker after 10 s). Seen in CI, and reproduced by holding
Redis's reply to a publish (tests/ops/test_beat_stops.py).

So beat's handler here closes nothing. Between ticks it raises `SystemExit` at once, and
`Service.start` closes the scheduler on its way out, outside any publish. During a tick it only
asks the tick to end the loop once its one publish is done; a second signal stops at once.
"""

from __future__ import annotations

from types import FrameType
from typing import Any

import celery.beat
from celery import platforms
from celery.signals import beat_init


class Scheduler(celery.beat.Scheduler):
    """The in-memory scheduler, told apart between ticks and during one (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ticking = False
        self.stop_requested = False
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        self.ticking = True
        try:
            interval: float = super().tick(*args, **kwargs)
        finally:
            self.ticking = False
        if self.stop_requested:
            # Raised from here, not from a signal handler: nothing is half done. Service.start
            # catches it and closes the scheduler, before the sleep that would follow the tick.
            raise SystemExit()
        return interval

    def request_stop(self) -> None:
        """Signal handler: stop now if between ticks, or once the tick in progress is done. A
        second signal during that tick stops at once: the publish may hang on a broker that
        does not answer (kombu sets no socket timeout), and a second Ctrl-C means now. Nothing
        is closed here either; redis-py drops the connection as the exit passes through it."""
        if self.ticking and not self.stop_requested:
            self.stop_requested = True
            return
        raise SystemExit()


@beat_init.connect
def _stop_between_ticks(sender: celery.beat.Service, **_: Any) -> None:
    """Replace Celery's stop handler, installed just before `beat_init` is sent."""
    scheduler = sender.scheduler
    if not isinstance(scheduler, Scheduler):
        return  # another scheduler (an operator's -S): Celery's own handling applies

    def stop(_signum: int, _frame: FrameType | None) -> None:
        scheduler.request_stop()

    # Celery's own signal table: like Celery's handler, none is installed off the main thread.
    platforms.signals.update(SIGTERM=stop, SIGINT=stop)
