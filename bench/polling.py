"""`python -m bench polling`: what one settlement-polling tick (beat's `poll_pending`) costs
with 1,000 vs 100,000 refunds awaiting vaultspay, the same number of them due.

Each size gets a fresh database filled with vaultspay jobs in `awaiting_gateway` (a realistic
row: amounts, references, poll deadline), `--due` of them due now and the rest due later. A
tick is `worker.engine.poll_pending` exactly as the beat task runs it — find the due jobs,
claim each poll (a compare-and-set), publish one `poll_job` message each to a real Redis — and is
timed `--repeat` times (the due jobs are made due again between ticks; the queue is emptied).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from datetime import timedelta
from typing import Any

from bench.common import machine, save_result, say
from bench.services import Services, interrupted_cleanly, postgres_version


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1000,100000", help="jobs waiting (1000,100000)")
    parser.add_argument("--due", type=int, default=100, help="jobs due in each tick (100)")
    parser.add_argument("--repeat", type=int, default=7, help="ticks per size (7)")
    parser.add_argument("--backends", default="sqlite,postgres", help="(sqlite,postgres)")
    parser.add_argument("--json", type=str, default=None)


def _activate(database_url: str, broker_url: str) -> None:
    """Point this process's refundq at the database and broker under test."""
    os.environ["REFUNDQ_DATABASE_URL"] = database_url
    os.environ["REFUNDQ_BROKER_URL"] = broker_url
    os.environ["REFUNDQ_LOG_LEVEL"] = "WARNING"
    from worker import db, gateways
    from worker.app import configure
    from worker.settings import get_settings

    get_settings.cache_clear()
    db.dispose_all()
    gateways.reset()
    configure()


def _fill(waiting: int, due: int) -> list[str]:
    """`waiting` awaiting vaultspay jobs, the first `due` of them due now. Returns the due ids."""
    from sqlalchemy import insert

    from worker.clock import utcnow
    from worker.db import get_engine
    from worker.models import Job

    now = utcnow()
    due_ids = []
    rows: list[dict[str, Any]] = []
    engine = get_engine()

    def flush() -> None:
        with engine.begin() as connection:
            connection.execute(insert(Job), rows)
        rows.clear()

    for i in range(waiting):
        job_id = uuid.uuid4().hex
        is_due = i < due
        if is_due:
            due_ids.append(job_id)
        rows.append(
            {
                "id": job_id,
                "kind": "refund",
                "provider": "vaultspay",
                "payment_ref": f"txn-{i}",
                "amount_minor": 5000,
                "original_amount_minor": 10000,
                "currency": "AED",
                "reason": "event cancelled",
                "extras": {},
                "idempotency_key": f"poll-{job_id}",
                "fingerprint": "0" * 64,
                "status": "awaiting_gateway",
                "attempt_count": 1,
                "needs_status_check": False,
                "ambiguous_sends": 0,
                "provider_reference": str(uuid.uuid4()),
                "raw_status": "0",
                # Due ones a second ago; the others spread over the next days (as a real
                # backlog is: each at its own point of the polling schedule).
                "next_poll_at": now - timedelta(seconds=1)
                if is_due
                else now + timedelta(seconds=600 + (i * 37) % 400_000),
                "poll_count": i % 20,
                "poll_deadline_at": now + timedelta(days=7),
                "created_at": now - timedelta(hours=1),
                "updated_at": now,
            }
        )
        if len(rows) >= 5000:
            flush()
    if rows:
        flush()
    return due_ids


def _make_due_again(due_ids: list[str]) -> None:
    from sqlalchemy import update
    from sqlmodel import col

    from worker.clock import utcnow
    from worker.db import get_engine
    from worker.models import Job

    with get_engine().begin() as connection:
        connection.execute(
            update(Job)
            .where(col(Job.id).in_(due_ids))
            .values(next_poll_at=utcnow() - timedelta(seconds=1))
        )


def _plan(backend: str) -> str:
    """How the database finds the due jobs (the partial index on next_poll_at)."""
    from sqlalchemy import select
    from sqlmodel import col

    from worker.clock import utcnow
    from worker.db import get_engine
    from worker.models import Job

    engine = get_engine()
    query = (
        select(col(Job.id))
        .where(col(Job.next_poll_at).is_not(None), col(Job.next_poll_at) <= utcnow())
        .order_by(col(Job.next_poll_at))
        .limit(200)
    )
    prefix = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
    with engine.connect() as connection:
        # The statement as the driver sees it, with its parameters in the driver's own style
        # (SQLite's are positional).
        compiled = query.compile(connection)
        params: Any = compiled.params
        if compiled.positiontup is not None:
            params = tuple(compiled.params[name] for name in compiled.positiontup)
        rows = connection.exec_driver_sql(prefix + str(compiled), params).all()
    return " | ".join(str(r[-1]) for r in rows)


def measure_size(
    services: Services, redis_url: str, backend: str, waiting: int, due: int, repeat: int
) -> dict[str, Any]:
    from worker.engine import poll_pending

    database_url = services.new_database(backend, f"poll-{backend}-{waiting}")
    try:
        _activate(database_url, redis_url)
        started = time.perf_counter()
        due_ids = _fill(waiting, due)
        fill_seconds = time.perf_counter() - started
        if backend == "postgres":
            from worker.db import get_engine

            with get_engine().begin() as connection:
                connection.exec_driver_sql("ANALYZE jobs")
        plan = _plan(backend)
        import redis as redis_client

        broker = redis_client.Redis.from_url(redis_url)
        published: list[str] = []
        timings = []
        for _ in range(repeat + 1):  # the first tick warms caches and is not counted
            _make_due_again(due_ids)
            broker.flushdb()
            published.clear()
            tick_started = time.perf_counter()
            counts = poll_pending(publish_poll=_publisher(published))
            timings.append(time.perf_counter() - tick_started)
            if counts["polled"] != due:
                raise RuntimeError(f"expected {due} polls, the tick made {counts}")
        timings = timings[1:]
    finally:
        from worker.db import dispose_all

        dispose_all()
        services.drop_database(database_url)
    median_ms = statistics.median(timings) * 1000
    say(
        f"  {backend:8s} {waiting:7d} waiting, {due} due: tick {median_ms:7.1f} ms "
        f"(min {min(timings) * 1000:.1f}, max {max(timings) * 1000:.1f}; fill {fill_seconds:.1f}s)"
    )
    say(f"           plan: {plan}")
    return {
        "backend": backend,
        "waiting": waiting,
        "due": due,
        "tick_ms_median": round(median_ms, 2),
        "tick_ms": [round(t * 1000, 2) for t in timings],
        "per_due_job_ms": round(median_ms / due, 3),
        "plan": plan,
    }


def _publisher(published: list[str]) -> Any:
    from worker.app import publish_poll

    def publish(job_id: str) -> None:
        publish_poll(job_id)
        published.append(job_id)

    return publish


def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    info = machine()
    info["versions"]["postgresql"] = postgres_version()
    say(f"polling: sizes {sizes}, {args.due} due, {args.repeat} ticks each")
    results = []
    summary: dict[str, Any] = {}
    with Services() as services, interrupted_cleanly(services):
        redis = services.start_redis()
        for backend in backends:
            for index, waiting in enumerate(sizes):
                results.append(
                    measure_size(
                        services, redis.url(index + 1), backend, waiting, args.due, args.repeat
                    )
                )
            mine = [r for r in results if r["backend"] == backend]
            small, large = mine[0], mine[-1]
            ratio = large["tick_ms_median"] / small["tick_ms_median"]
            summary[backend] = {
                "small": small["waiting"],
                "large": large["waiting"],
                "ratio": round(ratio, 3),
            }
            say(f"  {backend}: tick({large['waiting']}) / tick({small['waiting']}) = {ratio:.2f}")
    save_result(
        args.json,
        "polling",
        {
            "command": "polling",
            "machine": info,
            "settings": vars(args) | {"run": None},
            "summary": summary,
            "results": results,
        },
    )
