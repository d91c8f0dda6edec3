"""`python -m bench writes`: what refundq's own database work costs per job, in one process with
nothing else running — the floor under what `throughput` measures.

Three steps of a refund, each timed over `--n` jobs after a warm-up, on a fresh database:
* enqueue: `worker.jobs.insert_job` (the payment's lock on PostgreSQL, one read, the job and its
  event);
* claim: `worker.jobs.claim_job` with the turn's first attempt recorded, as a worker does for a
  gateway without a rate limit;
* outcome: `worker.jobs.apply` of a success.
No Celery, no Redis, no HTTP, no contention. Reported per job: wall time, CPU of this process
(the client: SQLAlchemy and the driver) and, on PostgreSQL, CPU of the server processes
serving it (read from /proc: the server must run on this host).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from bench.common import cpu_seconds, machine, save_result, say
from bench.services import Services, interrupted_cleanly, postgres_version

WARM_UP = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2000, help="jobs per step (2000)")
    parser.add_argument("--backends", default="sqlite,postgres", help="(sqlite,postgres)")
    parser.add_argument("--json", type=str, default=None)


def _server_pids() -> list[int]:
    """The PostgreSQL backends serving this process's connections."""
    from sqlalchemy import text

    from worker.db import get_engine

    with get_engine().connect() as connection:
        rows = connection.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        ).all()
    return [int(row.pid) for row in rows]


def _timed(step: Callable[[int], None], first: int, n: int, backend: str) -> dict[str, float]:
    for index in range(first, first + WARM_UP):  # compile, connect, fill the pool
        step(index)
    servers = _server_pids() if backend == "postgres" else []
    server_before = cpu_seconds(servers)
    client_before = time.process_time()
    wall_before = time.perf_counter()
    for index in range(first + WARM_UP, first + WARM_UP + n):
        step(index)
    figures = {
        "wall_ms": (time.perf_counter() - wall_before) * 1000 / n,
        "client_cpu_ms": (time.process_time() - client_before) * 1000 / n,
    }
    if servers:
        figures["server_cpu_ms"] = (cpu_seconds(servers) - server_before) * 1000 / n
    return {name: round(value, 3) for name, value in figures.items()}


def measure(services: Services, backend: str, n: int) -> dict[str, Any]:
    from bench import turn
    from worker import db
    from worker.settings import get_settings

    database_url = services.new_database(backend, f"writes-{backend}")
    os.environ["REFUNDQ_DATABASE_URL"] = database_url
    get_settings.cache_clear()
    db.dispose_all()
    total = n + WARM_UP
    claims: list[tuple[Any, int]] = []

    def enqueue(index: int) -> None:
        turn.enqueue(f"job-{index}", f"ord-{index}", f"key-{index}")

    def claim(index: int) -> None:
        claims.append(turn.claim(f"job-{index}", "bench"))

    def outcome(index: int) -> None:
        turn.succeed(*claims[index])

    try:
        steps = {
            "enqueue": _timed(enqueue, 0, n, backend),
            "claim": _timed(claim, 0, n, backend),
            "outcome": _timed(outcome, 0, n, backend),
        }
    finally:
        db.dispose_all()
        services.drop_database(database_url)
    assert len(claims) == total
    say(f"  {backend}:")
    for name, figures in steps.items():
        parts = "  ".join(f"{key} {value:6.3f}" for key, value in figures.items())
        say(f"    {name:8s} {parts}  (ms per job)")
    return {"backend": backend, "n": n, "steps": steps}


def main(args: argparse.Namespace) -> None:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    info = machine()
    if "postgres" in backends:
        info["versions"]["postgresql"] = postgres_version()
    os.environ["REFUNDQ_LOG_LEVEL"] = "WARNING"
    say(f"writes: {args.n} jobs per step, one process, no contention")
    with Services() as services, interrupted_cleanly(services):
        results = [measure(services, backend, args.n) for backend in backends]
    save_result(
        args.json,
        "writes",
        {
            "command": "writes",
            "machine": info,
            "settings": vars(args) | {"run": None},
            "results": results,
        },
    )
