"""Failpoints: named places in a job's turn where tests (and chaos runs) make a worker pause or
die, deterministically, in the spirit of TiKV's `fail-rs` and FoundationDB's BUGGIFY.

    REFUNDQ_FAILPOINTS="after_claim=sleep(30)"            # hold the claim, do nothing
    REFUNDQ_FAILPOINTS="after_send=kill"                   # the gateway answered; die unrecorded

Points: `after_claim` (claimed, nothing sent; the attempt is recorded already when the claim
recorded it, i.e. unless the gateway has a rate limit), `before_send` (the attempt is
recorded as sending, nothing sent yet), `after_send` (the gateway answered, nothing recorded).
Actions: `sleep(<seconds>)`, `jitter(<seconds>)` (sleep a random time up to that: a slow
commit, a descheduled process), `kill` (SIGKILL this process), `kill(<probability>)`.
Unset in production: the check is one dictionary lookup.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from functools import lru_cache

_ACTION = re.compile(r"(sleep|jitter|kill)(?:\(([0-9.]+)\))?")


@lru_cache(maxsize=1)
def _configured() -> dict[str, tuple[str, float | None]]:
    spec = os.environ.get("REFUNDQ_FAILPOINTS", "")
    points: dict[str, tuple[str, float | None]] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, _, action = item.partition("=")
        match = _ACTION.fullmatch(action.strip())
        if not match:
            raise ValueError(f"REFUNDQ_FAILPOINTS: cannot read {item!r}")
        argument = float(match.group(2)) if match.group(2) else None
        points[name.strip()] = (match.group(1), argument)
    return points


def failpoint(name: str) -> None:
    """Pause or die here if a test asked for it."""
    action = _configured().get(name)
    if action is None:
        return
    verb, argument = action
    if verb == "sleep":
        time.sleep(argument or 0)
    elif verb == "jitter":
        time.sleep(random.uniform(0, argument or 0))
    elif verb == "kill" and (argument is None or random.random() < argument):
        os.kill(os.getpid(), signal.SIGKILL)
