"""Per-gateway rate limits shared by every worker on every host, through Redis.

`REFUNDQ_RATE_LIMITS='{"bbmsl": 10}'` caps the calls refundq makes to bbmsl at 10 per second,
whatever the number of workers. The limiter is GCRA-style virtual scheduling ("generic cell
rate algorithm", as in redis-cell and Stripe's rate limiters): one Redis key per gateway holds
the theoretical arrival time (TAT) of the next call; a call reserves the slot at
`max(now, TAT)` and pushes TAT one interval further. Calls are therefore spaced evenly, and a
worker knows exactly when its turn comes — no retry storm of workers polling for a free slot.

* One Lua script does read-modify-write atomically, with Redis's own clock (`TIME`), so hosts
  with skewed clocks share one schedule.
* The interval is `margin / R` with a margin of 1.1: a request leaves the worker a moment after
  its slot and reaches the gateway after a network delay that varies by a few milliseconds; the
  margin keeps that jitter from ever putting R + 1 calls into one second at the gateway, at the
  price of running at about 0.91 R.
* A slot is a promise about when the call leaves, so the call must leave on time. The slot is
  taken before the attempt's commit (so a worker that dies waiting for it leaves no `sending`
  attempt behind); a slow commit or a descheduled process can then make the call late, and a
  call late by more than the margin's 0.1 s lands in the same second as a later slot's call.
  `keep_on_time`, right before the call, therefore gives up a slot the call is more than
  `LATE_TOLERANCE_SECONDS` late for and waits for a fresh one (issue 7: under a loaded
  machine a gateway limited to 5/s saw 7 calls in one second before this). Lateness is read
  on the local monotonic clock against the earliest moment the slot can have been, so it is
  never underestimated; sleeps end at the latest moment, so a call is never early.
* A reservation more than `max_wait` away is refused without being taken (no slot is wasted):
  the caller hands the job back to the queue for that long, freeing the worker for other
  gateways' jobs. A nearer one is simply waited for: with prefetch 1 a worker holds one job, so
  reservations run at most (workers / R) seconds ahead.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

MARGIN = 1.1
# How late a call may leave after its slot. R slots span MARGIN seconds, so R + 1 calls can
# only meet in one second if lateness plus the network's jitter exceed MARGIN - 1 (0.1 s).
LATE_TOLERANCE_SECONDS = 0.05

# KEYS[1] = the gateway's TAT key; ARGV = interval (s), max_wait (s), key ttl (ms).
# Returns {granted (1|0), wait (s, as a string: Lua numbers lose precision in replies)}.
_RESERVE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now
if wait > max_wait then
  return {0, tostring(wait - max_wait)}
end
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', tonumber(ARGV[3]))
return {1, tostring(wait)}
"""


@dataclass(frozen=True)
class Reservation:
    granted: bool
    wait_seconds: float  # granted: until the slot; refused: how long to come back after
    # Local monotonic bounds of the slot's moment (the Redis call's round trip lies between):
    # lateness is measured from the earliest, sleeps end at the latest. None: no limit applies.
    earliest: float | None = None
    latest: float | None = None

    def late_by(self) -> float:
        """Seconds since the slot (0 when unlimited or not yet due)."""
        if self.earliest is None:
            return 0.0
        return max(0.0, time.monotonic() - self.earliest)


UNLIMITED = Reservation(True, 0.0)


class RateLimiter:
    """Reserve call slots for gateways with a configured rate. Thread- and fork-safe."""

    def __init__(self, url: str, limits: dict[str, float], *, max_wait: float = 2.0) -> None:
        self.url = url
        self.limits = limits
        self.max_wait = max_wait
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._script: Script | None = None

    def _reserve_script(self) -> Script:
        import redis

        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = redis.Redis.from_url(self.url, socket_timeout=5)
                self._script = self._client.register_script(_RESERVE)
                self._pid = os.getpid()
            assert self._script is not None
            return self._script

    def reserve(self, provider: str, max_wait: float | None = None) -> Reservation:
        """A slot for one call to `provider` (granted at once for unlimited gateways), or a
        refusal when the slot would be more than `max_wait` (default: the limiter's) away."""
        rate = self.limits.get(provider)
        if not rate:
            return UNLIMITED
        max_wait = self.max_wait if max_wait is None else max_wait
        interval = MARGIN / rate
        ttl_ms = int((max_wait + interval) * 1000) + 60_000
        script = self._reserve_script()
        asked = time.monotonic()
        granted, wait = script(
            keys=[f"refundq:ratelimit:{provider}"], args=[interval, max_wait, ttl_ms]
        )
        answered = time.monotonic()
        wait = float(wait)
        if not int(granted):
            return Reservation(False, wait)
        return Reservation(True, wait, earliest=asked + wait, latest=answered + wait)

    def wait_for_slot(self, provider: str, max_wait: float | None = None) -> Reservation:
        """Reserve, and sleep until a granted slot comes (at most `max_wait`)."""
        reservation = self.reserve(provider, max_wait)
        if reservation.granted and reservation.latest is not None:
            pause = reservation.latest - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        return reservation

    def keep_on_time(
        self, provider: str, reservation: Reservation, *, within: float
    ) -> Reservation:
        """Call right before the gateway call: `reservation` if the call is still on time for
        it, else a fresh slot, waited for (the stale one goes unused). Refused when no on-time
        slot could be had within `within` seconds; the call must then not be made."""
        deadline = time.monotonic() + within
        while reservation.late_by() > LATE_TOLERANCE_SECONDS:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Reservation(False, self.max_wait)
            reservation = self.wait_for_slot(provider, max_wait=remaining)
            if not reservation.granted:
                return reservation
        return reservation


_limiter: dict[str, RateLimiter | None] = {}


def limiter(settings: Settings | None = None) -> RateLimiter | None:
    """This deployment's limiter, or None when no gateway is limited (then nothing is asked of
    Redis at all)."""
    settings = settings or get_settings()
    key = f"{settings.rate_limits}|{settings.rate_limit_redis_url or settings.broker_url}"
    if key not in _limiter:
        limits = parse_limits(settings.rate_limits)
        url = settings.rate_limit_redis_url or settings.broker_url
        _limiter.clear()
        _limiter[key] = RateLimiter(url, limits) if limits else None
    return _limiter[key]


def parse_limits(text: str | None) -> dict[str, float]:
    """`{"bbmsl": 10}` -> {"bbmsl": 10.0}; anything else is a configuration error."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"REFUNDQ_RATE_LIMITS is not JSON: {exc}") from exc
    if not isinstance(raw, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in raw.values()
    ):
        raise ValueError('REFUNDQ_RATE_LIMITS must look like {"bbmsl": 10} (calls per second)')
    return {str(k): float(v) for k, v in raw.items()}
