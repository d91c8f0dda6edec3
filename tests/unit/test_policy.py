"""Retry and polling policy."""

from __future__ import annotations

import random

from worker.policy import DEFAULT_POLL_SCHEDULE, RetryPolicy, polls_within

DAY = 86400


def test_retry_delays_grow_exponentially_with_full_jitter_inside_their_window():
    random.seed(7)
    policy = RetryPolicy(base_seconds=1, cap_seconds=60, floor_seconds=0.5)
    for attempt in range(1, 10):
        low, high = policy.window(attempt)
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(low <= d <= high for d in delays)
        # Full jitter: delays spread over the whole window, not clustered at its top.
        assert min(delays) < low + (high - low) * 0.2
        assert max(delays) > low + (high - low) * 0.8
    assert policy.window(10) == (0.5, 60.5)  # capped


def test_retry_after_wins_when_longer_but_never_beyond_the_cap():
    policy = RetryPolicy(base_seconds=0.1, cap_seconds=30, floor_seconds=0)
    assert policy.delay(1, retry_after=12) == 12
    assert policy.delay(1, retry_after=3600) == 30


def test_poll_schedule_costs_a_few_dozen_calls_over_three_working_days():
    assert polls_within(DEFAULT_POLL_SCHEDULE, 3 * DAY) == 28
    assert polls_within(DEFAULT_POLL_SCHEDULE, 5 * DAY) == 40  # three working days + a weekend
    assert polls_within(DEFAULT_POLL_SCHEDULE, 7 * DAY) == 52
    assert DEFAULT_POLL_SCHEDULE[0] == 60
