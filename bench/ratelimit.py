"""`python -m bench ratelimit`: a per-gateway rate limit, shared by several workers through
Redis, under load. With R calls/s configured for vai247 (`REFUNDQ_RATE_LIMITS`), thousands of
refunds are enqueued at once; afterwards the sandbox's own call log (`GET /_admin/calls`, each
call stamped on arrival) is read to find the busiest one-second window — sliding, so every
window counts, not only whole clock seconds — and the achieved rate against R.
"""

from __future__ import annotations

import argparse
import bisect
from collections import Counter
from datetime import datetime

from bench.common import machine, save_result, say
from bench.services import Services, interrupted_cleanly
from bench.stack import RunConfig, Stack, run_once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=20.0, help="R, calls/s for vai247 (20)")
    parser.add_argument("--n", type=int, default=2000, help="refunds (2000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--pool", default="prefork", help="(prefork)")
    parser.add_argument("--concurrency", type=int, default=4, help="per worker (4)")
    parser.add_argument("--backend", default="postgres", help="sqlite | postgres (postgres)")
    parser.add_argument("--json", type=str, default=None)


def busiest_window(arrivals: list[float], width: float = 1.0) -> tuple[int, float]:
    """The most arrivals in any half-open window [t, t + width), and where it starts."""
    best, start = 0, arrivals[0] if arrivals else 0.0
    for i, first in enumerate(arrivals):
        count = bisect.bisect_left(arrivals, first + width, lo=i) - i
        if count > best:
            best, start = count, first
    return best, start


def main(args: argparse.Namespace) -> None:
    info = machine()
    say(
        f"ratelimit: R={args.rate:g}/s for vai247, {args.n} refunds, {args.workers} workers x "
        f"{args.pool}{args.concurrency}, {args.backend}"
    )
    config = RunConfig(
        target="refundq",
        backend=args.backend,
        n=args.n,
        pool=args.pool,
        concurrency=args.concurrency,
        workers=args.workers,
        extra_env={"REFUNDQ_RATE_LIMITS": f'{{"vai247": {args.rate:g}}}'},
    )
    with Services() as services, interrupted_cleanly(services):
        stack = Stack(services, payments=args.n)
        calls_before = len(stack.sandbox.calls("vai247", "refund"))
        figures = run_once(stack, config)
        calls = stack.sandbox.calls("vai247", "refund")[calls_before:]
    arrivals = sorted(
        datetime.fromisoformat(c["at"].replace("Z", "+00:00")).timestamp() for c in calls
    )
    busiest, where = busiest_window(arrivals)
    per_clock_second = Counter(int(t) for t in arrivals)
    span = arrivals[-1] - arrivals[0]
    achieved = (len(arrivals) - 1) / span if span else 0.0
    # The steady part: leave out the first and last second of the run.
    steady = [c for s, c in sorted(per_clock_second.items())[1:-1]]
    summary = {
        "limit_per_second": args.rate,
        "calls": len(arrivals),
        "busiest_sliding_second": busiest,
        "busiest_clock_second": max(per_clock_second.values()),
        "limit_held": busiest <= args.rate,
        "achieved_rate": round(achieved, 2),
        "achieved_over_limit": round(achieved / args.rate, 3),
        "steady_clock_seconds": {
            "min": min(steady, default=0),
            "max": max(steady, default=0),
            "mean": round(sum(steady) / len(steady), 2) if steady else 0,
        },
        "statuses": figures["statuses"],
        "latency": figures["latency"],
    }
    say(
        f"  {len(arrivals)} calls over {span:.1f}s: busiest 1-s window {busiest} "
        f"(limit {args.rate:g}: {'held' if summary['limit_held'] else 'BROKEN'}), busiest clock "
        f"second {summary['busiest_clock_second']}, achieved {achieved:.2f}/s "
        f"= {achieved / args.rate:.0%} of R; jobs {figures['statuses']}"
    )
    save_result(
        args.json,
        "ratelimit",
        {
            "command": "ratelimit",
            "machine": info,
            "settings": {
                "rate": args.rate,
                "n": args.n,
                "workers": args.workers,
                "pool": args.pool,
                "concurrency": args.concurrency,
                "backend": args.backend,
            },
            "summary": summary,
            "busiest_window_starts_at": where,
            "calls_per_clock_second": dict(sorted(per_clock_second.items())),
            "run": figures,
        },
    )
