"""How beat's scheduler takes a stop signal (worker/beat.py), on the scheduler alone: between
ticks it leaves at once; during a tick it lets the tick finish and leaves before sleeping; a
second signal during that tick leaves at once. tests/ops/test_beat_stops.py shows the real
beat process doing it against Redis."""

from __future__ import annotations

from collections.abc import Callable

import celery.beat
import pytest

from worker.app import app
from worker.beat import Scheduler


def _scheduler_whose_tick(
    monkeypatch: pytest.MonkeyPatch, during: Callable[[Scheduler], None]
) -> tuple[Scheduler, list[str]]:
    """A scheduler whose tick (Celery's part of it) runs `during` and returns a 5 s sleep."""
    events: list[str] = []

    def tick(self: Scheduler, *_args: object, **_kwargs: object) -> float:
        during(self)
        events.append("tick finished")
        return 5.0

    monkeypatch.setattr(celery.beat.Scheduler, "tick", tick)
    return Scheduler(app=app, lazy=True), events


def test_a_stop_between_ticks_leaves_at_once():
    scheduler = Scheduler(app=app, lazy=True)
    with pytest.raises(SystemExit):
        scheduler.request_stop()


def test_a_tick_with_nothing_asked_returns_its_sleep(monkeypatch):
    scheduler, events = _scheduler_whose_tick(monkeypatch, lambda s: None)
    assert scheduler.tick() == 5.0
    assert events == ["tick finished"] and not scheduler.ticking


def test_a_stop_during_a_tick_lets_it_finish_and_leaves_before_the_sleep(monkeypatch):
    scheduler, events = _scheduler_whose_tick(monkeypatch, Scheduler.request_stop)
    with pytest.raises(SystemExit):
        scheduler.tick()
    assert events == ["tick finished"]
    assert not scheduler.ticking


def test_a_second_stop_during_a_tick_leaves_at_once(monkeypatch):
    def twice(scheduler: Scheduler) -> None:
        scheduler.request_stop()
        scheduler.request_stop()

    scheduler, events = _scheduler_whose_tick(monkeypatch, twice)
    with pytest.raises(SystemExit):
        scheduler.tick()
    assert events == []
    assert not scheduler.ticking
