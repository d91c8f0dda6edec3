"""Retry and polling policy, as data (STYLE.md 3). One place for each.

Retries (DESIGN.md rule 6): exponential backoff with full jitter over a floor, capped —
`floor + uniform(0, min(cap, base * 2**(attempt-1)))` — computed with Celery's own
`get_exponential_backoff_interval` (in milliseconds, so sub-second bases work in tests). The
floor keeps a retry from landing on the heels of the failure it answers; full jitter spreads a
thundering herd after a gateway outage (AWS Architecture Blog, "Exponential Backoff And Jitter").
A gateway's Retry-After wins when it asks for longer.

Polling (issue 4): a table of delays between status polls, the last one repeating, up to a
deadline. See `DEFAULT_POLL_SCHEDULE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from celery.utils.time import get_exponential_backoff_interval

from worker.settings import Settings


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float
    cap_seconds: float
    floor_seconds: float
    # A job whose sends never reached the gateway (connect refused, 503, 429) fails only when
    # it has used its attempts *and* has been trying this long: outages are waited out.
    patience_seconds: float = 0.0

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        jitter_ms = get_exponential_backoff_interval(
            factor=max(1, round(self.base_seconds * 1000)),
            retries=max(0, attempt - 1),
            maximum=max(1, round(self.cap_seconds * 1000)),
            full_jitter=True,
        )
        delay = self.floor_seconds + jitter_ms / 1000
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap_seconds))
        return delay

    def window(self, attempt: int) -> tuple[float, float]:
        """The range `delay(attempt)` falls in (without Retry-After): for tests and docs."""
        top = min(self.cap_seconds, self.base_seconds * 2 ** max(0, attempt - 1))
        return self.floor_seconds, self.floor_seconds + top

    def immediate(self) -> RetryPolicy:
        """No wait: for work that provably never reached the gateway (a worker lost before
        sending)."""
        return replace(self, base_seconds=0.001, cap_seconds=0.001, floor_seconds=0.0)


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        base_seconds=settings.retry_base_seconds,
        cap_seconds=settings.retry_cap_seconds,
        floor_seconds=settings.retry_floor_seconds,
        patience_seconds=settings.retry_patience_seconds,
    )


MINUTE = 60.0
HOUR = 3600.0

# Delays between status polls of one refund awaiting the gateway (vaultspay reviews refunds by
# hand within three working days). Quick at first — many answers come the same day — then
# hourly through the working day, then every four hours: 1, 2, 5, 15, 30 min, 8 x 1 h, then 4 h.
# Cost of one refund (`polls_within`, checked by tests/test_policy.py): 13 polls in the first
# 8 h 53 min, 28 within three calendar days, 40 within five (three working days across a
# weekend), 52 by the 7-day deadline — against 864 for a flat 5-minute poll over three days.
DEFAULT_POLL_SCHEDULE: tuple[float, ...] = (
    1 * MINUTE,
    2 * MINUTE,
    5 * MINUTE,
    15 * MINUTE,
    30 * MINUTE,
    *([1 * HOUR] * 8),
    4 * HOUR,
)


def poll_schedule(settings: Settings) -> Sequence[float]:
    return tuple(settings.poll_schedule_seconds or DEFAULT_POLL_SCHEDULE)


def poll_delay(schedule: Sequence[float], polls_done: int) -> float:
    """The wait after the `polls_done`-th poll (0 = the first wait after acceptance)."""
    return schedule[min(polls_done, len(schedule) - 1)]


def polls_within(schedule: Sequence[float], seconds: float) -> int:
    """How many polls one refund costs within `seconds` of acceptance."""
    count, elapsed = 0, 0.0
    while True:
        elapsed += poll_delay(schedule, count)
        if elapsed > seconds:
            return count
        count += 1
