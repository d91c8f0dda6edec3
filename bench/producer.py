"""One producer process: enqueue N refunds through refundq's Python API, publish N baseline
tasks, or do the floor's enqueue (bench/floor.py), as fast as it can or at a fixed rate. Run by
the bench as a subprocess (its environment points it at the stack); prints one JSON line with
its timings.

    python -m bench.producer refundq --n 5000 --prefix bench-1- --run r1 [--rate 200]
    python -m bench.producer baseline --n 5000 --prefix bench-1-
    python -m bench.producer floor --n 5000 --prefix bench-1- --run r1
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable

ORIGINAL_AMOUNT = "1000000.00"
REFUND_AMOUNT = "1.00"
CURRENCY = "HKD"


class _Pacer:
    """Job i leaves at 1/rate intervals, counted from the end of the first job's enqueue.

    The first enqueue of a fresh process is slow (imports, connections, SQL compiled; about
    0.2 s for refundq's producer against a few ms for a bare publish), and a clock started
    before it made the next jobs leave at once to catch up: a burst of some twenty jobs at the
    start of every paced run, whose queueing was the paced p99 (BENCHMARKS.md)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.clock = time.perf_counter()

    def wait(self, index: int) -> None:
        if not self.rate:
            return
        if index == 1:
            self.clock = time.perf_counter() - 1 / self.rate
        delay = self.clock + index / self.rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def produce_refundq(n: int, prefix: str, run: str, rate: float | None, offset: int) -> None:
    from worker.client import enqueue_refund

    def send(i: int) -> None:
        enqueue_refund(
            provider="vai247",
            payment_ref=f"{prefix}{offset + i}",
            amount=REFUND_AMOUNT,
            currency=CURRENCY,
            original_amount=ORIGINAL_AMOUNT,
            idempotency_key=f"{run}-{offset + i}",
            reason="event cancelled",
        )

    _produce(n, rate, send)


def produce_baseline(n: int, prefix: str, rate: float | None, offset: int) -> None:
    from bench.baseline import TASK, app
    from worker.app import QUEUE

    def send(i: int) -> None:
        app.send_task(TASK, args=[f"{prefix}{offset + i}", time.time()], queue=QUEUE)

    _produce(n, rate, send)


def produce_floor(n: int, prefix: str, run: str, rate: float | None, offset: int) -> None:
    from bench.floor import TASK, Producer, app
    from worker.app import QUEUE

    producer = Producer()

    def send(i: int) -> None:
        payment_ref = f"{prefix}{offset + i}"
        job_id = producer.enqueue(payment_ref, f"{run}-{offset + i}")
        app.send_task(TASK, args=[job_id, payment_ref], queue=QUEUE)

    _produce(n, rate, send)


def _produce(n: int, rate: float | None, send: Callable[[int], None]) -> None:
    """`send(i)` for i in 0..n-1, paced, then the loop's figures on stdout."""
    cpu_at_start = _cpu()
    started = time.perf_counter()
    first_wall = time.time()
    pacer = _Pacer(rate)
    for i in range(n):
        pacer.wait(i)
        send(i)
    _report(n, started, first_wall, cpu_at_start)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(n: int, started: float, first_wall: float, cpu_at_start: float) -> None:
    """The loop's figures (imports and connection setup before it are not counted)."""
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "n": n,
                "seconds": seconds,
                "rate": n / seconds if seconds else 0.0,
                "first_wall": first_wall,
                "cpu_seconds": _cpu() - cpu_at_start,
            }
        ),
        flush=True,
    )


def module_args(target: str, n: int, prefix: str, run: str, rate: float | None = None) -> list[str]:
    """What follows `python -m` to run this producer (the one place its command line is built)."""
    args = ["bench.producer", target, "--n", str(n), "--prefix", prefix, "--run", run]
    return [*args, "--rate", str(rate)] if rate else args


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.producer")
    parser.add_argument("target", choices=["refundq", "baseline", "floor"])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--prefix", required=True, help="payment refs are <prefix><index>")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--run", default="run", help="idempotency keys are <run>-<index>")
    parser.add_argument("--rate", type=float, default=None, help="jobs/s (default: flat out)")
    args = parser.parse_args()
    if args.target == "refundq":
        produce_refundq(args.n, args.prefix, args.run, args.rate, args.offset)
    elif args.target == "floor":
        produce_floor(args.n, args.prefix, args.run, args.rate, args.offset)
    else:
        produce_baseline(args.n, args.prefix, args.rate, args.offset)


if __name__ == "__main__":
    main()
