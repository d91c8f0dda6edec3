"""`python -m bench profile`: where one job's time goes.

N refunds are enqueued first (by a producer process under cProfile: the enqueue side), then one
worker drains them. Two views of the worker:

* `--mode cprofile` (default): a `--pool solo` worker under cProfile, so every task runs in the
  profiled process. Wall time per job in each phase of a turn — claim with the attempt row
  (one transaction; the attempt is recorded apart only for rate-limited gateways), the gateway
  call (provider + httpx + the sandbox answering), apply the outcome (one transaction),
  on_settled — and what is left to Celery (receiving, acknowledging, events, its own logging);
  plus SQL statements, commits and pool checkouts per job.
  cProfile inflates Python-heavy code against C and I/O, so read shares, not absolutes.
* `--mode py-spy`: a worker with the pool under test (default prefork x4) drains a full queue
  under py-spy (non-idle samples only: CPU, which is what limits a 2-core machine); the stacks
  are grouped by phase and weighed with the worker's CPU time from /proc, giving CPU ms per job
  per phase — for refundq and, the same way, for the bare-Celery baseline.
"""

from __future__ import annotations

import argparse
import json
import pstats
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    machine,
    python,
    save_result,
    say,
    tree_cpu_seconds,
)
from bench.producer import module_args
from bench.services import Services, interrupted_cleanly, wait_for, wait_ready, worker_argv
from bench.stack import PAYMENT_PREFIX, Stack

# (file suffix, function) -> phase; cumulative times are read for each.
PHASES: list[tuple[str, str, str]] = [
    ("tasks/__init__.py", "execute_job", "task body (refundq)"),
    ("worker/jobs.py", "claim_job", "claim + attempt row (txn 1)"),
    ("worker/jobs.py", "record_attempt", "record attempt apart (rate-limited gateways)"),
    ("worker/engine.py", "_call", "gateway call (provider + HTTP)"),
    ("providers/base.py", "send", "  of which httpx send+read"),
    ("worker/jobs.py", "apply", "apply outcome (txn 2)"),
    ("worker/engine.py", "on_settled", "on_settled (notify check)"),
    ("logging/__init__.py", "_log", "logging (all, incl. Celery's)"),
]
ENQUEUE_PHASES: list[tuple[str, str, str]] = [
    ("worker/client.py", "submit", "enqueue_refund total"),
    ("worker/client.py", "build_new_job", "validation"),
    ("worker/jobs.py", "insert_job", "insert job + event (txn)"),
    ("worker/jobs.py", "_key_and_live_refunds", "  of which key + live refunds (one read)"),
    ("worker/jobs.py", "_check_refund_fits", "  of which over-refund check"),
    ("worker/client.py", "publish_new", "publish to Redis (task + sent event)"),
    ("celery/events/dispatcher.py", "publish", "  of which task-sent event"),
    ("views.py", "of", "JobView"),
]
DRIVER = [
    ("~", "<method 'execute' of 'sqlite3.Cursor' objects>", "sqlite3 execute"),
    ("~", "<method 'commit' of 'sqlite3.Connection' objects>", "sqlite3 commit"),
    ("psycopg/cursor.py", "execute", "psycopg execute"),
    ("psycopg/connection.py", "commit", "psycopg commit"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2000, help="jobs (2000)")
    parser.add_argument("--backends", default="sqlite,postgres", help="(sqlite,postgres)")
    parser.add_argument("--mode", choices=["cprofile", "py-spy"], default="cprofile")
    parser.add_argument("--pool", default="prefork", help="py-spy mode: pool (prefork)")
    parser.add_argument("--concurrency", type=int, default=4, help="py-spy mode (4)")
    parser.add_argument("--keep", type=str, default=None, help="directory to keep .prof files in")
    parser.add_argument("--json", type=str, default=None)


def _cumulative(stats: pstats.Stats, wanted: list[tuple[str, str, str]]) -> dict[str, float]:
    found: dict[str, float] = {}
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, _nc, _tt, cumulative, _callers) in raw.items():
        for suffix, name, label in wanted:
            if function == name and (
                filename.endswith(suffix) or (suffix == "~" and filename == "~")
            ):
                found[label] = found.get(label, 0.0) + cumulative
    # In the order `wanted` declares, so each "of which" line follows its phase.
    return {label: found[label] for _suffix, _name, label in wanted if label in found}


def _profile_backend(stack: Stack, backend: str, n: int, keep: Path | None) -> dict[str, Any]:
    services = stack.services
    redis_db = stack.new_redis_db()
    database_url = services.new_database(backend, f"profile-{redis_db}")
    env = stack.env(database_url, redis_db)
    workdir = services.workdir
    producer_prof = workdir / f"producer-{backend}.prof"
    worker_prof = workdir / f"worker-{backend}.prof"
    counts_path = workdir / f"counts-{backend}.json"
    try:
        # Enqueue everything first: the worker then drains a full queue, never idle.
        subprocess.run(
            [
                python(),
                "-m",
                "cProfile",
                "-o",
                str(producer_prof),
                "-m",
                *module_args("refundq", n, PAYMENT_PREFIX, f"p{redis_db}"),
            ],
            cwd=REPO,
            env={**env, "REFUNDQ_LOG_LEVEL": "WARNING"},
            check=True,
            capture_output=True,
        )
        argv = [
            python(),
            "-m",
            "bench.profiled_worker",
            str(worker_prof),
            str(counts_path),
            "--",
            *worker_argv("worker.app", "solo", 1, "profiled")[3:],
        ]
        started = time.perf_counter()
        worker = services.spawn("profiled-worker", argv, env)
        wait_ready([worker])
        from sqlalchemy import create_engine, text

        from worker.db import normalise_url

        engine = create_engine(normalise_url(database_url))

        def finished() -> bool:
            with engine.connect() as connection:
                done = connection.execute(
                    text("select count(*) from jobs where finished_at is not null")
                ).scalar_one()
            return int(done) >= n

        wait_for(finished, timeout=n / 5 + 120, what="the profiled worker", interval=0.5)
        drain = time.perf_counter() - started
        engine.dispose()
        worker.popen.send_signal(signal.SIGTERM)
        worker.popen.wait(timeout=60)
        services.stop(worker)
    finally:
        services.drop_database(database_url)
    worker_stats = pstats.Stats(str(worker_prof))
    producer_stats = pstats.Stats(str(producer_prof))
    counts = json.loads(counts_path.read_text())
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(worker_prof, keep / worker_prof.name)
        shutil.copy(producer_prof, keep / producer_prof.name)
    per_job = {k: round(v * 1000 / n, 3) for k, v in _cumulative(worker_stats, PHASES).items()}
    total = counts.pop("wall_seconds_x1000") / n
    per_job["celery and idle (rest of the worker's wall time)"] = round(
        total - per_job.get("task body (refundq)", 0.0), 3
    )
    driver = {k: round(v * 1000 / n, 3) for k, v in _cumulative(worker_stats, DRIVER).items()}
    enqueue = {
        k: round(v * 1000 / n, 3) for k, v in _cumulative(producer_stats, ENQUEUE_PHASES).items()
    }
    result = {
        "backend": backend,
        "n": n,
        "worker_wall_ms_per_job_under_cprofile": round(total, 3),
        "drain_seconds_incl_startup": round(drain, 2),
        "worker_ms_per_job": per_job,
        "db_driver_ms_per_job": driver,
        "per_job_counts": {k: round(v / n, 2) for k, v in sorted(counts.items())},
        "enqueue_ms_per_job": enqueue,
    }
    say(f"\n{backend}: worker wall per job under cProfile {total:.2f} ms")
    for label, value in per_job.items():
        say(f"  {label:52s} {value:7.3f} ms")
    for label, value in driver.items():
        say(f"  driver: {label:44s} {value:7.3f} ms")
    say(f"  per job: {result['per_job_counts']}")
    say("  enqueue side (producer under cProfile):")
    for label, value in enqueue.items():
        say(f"    {label:50s} {value:7.3f} ms")
    return result


# (function, file) -> phase. py-spy's raw frames read "function (path/to/file.py:line)".
CATEGORIES = [
    ("claim_job", "worker/jobs.py", "claim + attempt row (txn 1)"),
    ("record_attempt", "worker/jobs.py", "record attempt apart (rate-limited gateways)"),
    ("json_bytes", "providers/base.py", "gateway: request body (json_bytes)"),
    ("send", "providers/base.py", "gateway: httpx send + read"),
    ("_call", "worker/engine.py", "gateway: provider other (models, parsing)"),
    ("_apply", "worker/engine.py", "apply outcome (txn 2)"),
    ("on_settled", "worker/engine.py", "on_settled"),
    ("_log", "logging/__init__.py", "logging"),
]
BASELINE_CATEGORIES = [
    ("post", "httpx/_client.py", "gateway: httpx send + read"),
    ("rpush", "redis/commands/core.py", "baseline: record result in Redis"),
    ("_log", "logging/__init__.py", "logging"),
]


def _is(frame: str, function: str, filename: str) -> bool:
    name, _, where = frame.partition(" (")
    return (name == function or name.endswith(f".{function}")) and f"{filename}:" in where


def _categorise(raw: str, baseline: bool = False) -> dict[str, int]:
    """py-spy's raw (collapsed) stacks, grouped by the phase of a job they belong to: the
    deepest marker on the stack below the task's frame decides."""
    shares: Counter[str] = Counter()
    task = ("refund", "bench/baseline.py") if baseline else ("execute_job", "worker/engine.py")
    categories = BASELINE_CATEGORIES if baseline else CATEGORIES
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue  # a message py-spy wrote among the stacks, not a sample
        frames = stack.split(";")
        count = int(count_text)
        task_at = next((i for i, f in enumerate(frames) if _is(f, *task)), None)
        if task_at is None:
            in_logging = any(_is(f, "_log", "logging/__init__.py") for f in frames)
            shares["celery: logging" if in_logging else "celery (outside the task)"] += count
            continue
        category = "task: other"
        for frame in reversed(frames[task_at + 1 :]):
            found = next((label for fn, file, label in categories if _is(frame, fn, file)), None)
            if found is not None:
                category = found
                break
        shares[category] += count
    return dict(shares)


def _py_spy_target(
    stack: Stack,
    target: str,
    backend: str | None,
    n: int,
    pool: str,
    concurrency: int,
    keep: Path | None,
) -> dict[str, Any]:
    """Fill the queue with `n` jobs, then let one worker drain it under py-spy (non-idle
    samples of the worker and its pool processes) and read its CPU time from /proc."""
    from bench.stack import Run, RunConfig

    py_spy = shutil.which("py-spy") or str(Path(python()).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("--mode py-spy needs py-spy: pip install -e '.[bench]'")
    services = stack.services
    redis_db = stack.new_redis_db()
    database_url = services.new_database(backend, f"pyspy-{redis_db}") if backend else None
    config = RunConfig(target=target, backend=backend, n=n, pool=pool, concurrency=concurrency)
    run = Run(config, stack, stack.env(database_url, redis_db), redis_db, database_url)
    name = f"{target}-{backend}" if backend else target
    raw_path = services.workdir / f"py-spy-{name}.txt"
    try:
        run.produce(n, PAYMENT_PREFIX, f"s{redis_db}", None).communicate(timeout=600)
        run.config.beat = False
        run.start()
        before = sum(tree_cpu_seconds(pid) for pid in run.worker_pids())
        sampler = subprocess.Popen(
            [py_spy, "record", "--pid", str(run.worker_pids()[0]), "--subprocesses",
             "--format", "raw", "--rate", "250", "--output", str(raw_path), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started = time.perf_counter()
        run.wait_done(n, timeout=n / 5 + 120)
        seconds = time.perf_counter() - started
        cpu = sum(tree_cpu_seconds(pid) for pid in run.worker_pids()) - before
        sampler.send_signal(signal.SIGINT)
        sampler.wait(timeout=60)
    finally:
        run.stop()
        if database_url:
            services.drop_database(database_url)
    shares = _categorise(raw_path.read_text(), baseline=target == "baseline")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw_path, keep / raw_path.name)
    total = sum(shares.values())
    cpu_ms = cpu * 1000 / n
    per_job = {label: round(cpu_ms * count / total, 3) for label, count in shares.items()}
    say(
        f"\n{name}: {pool}x{concurrency}, drained {n} in {seconds:.1f}s ({n / seconds:.0f}/s), "
        f"worker CPU {cpu_ms:.2f} ms/job, {total} samples"
    )
    for label, value in sorted(per_job.items(), key=lambda kv: -kv[1]):
        say(f"  {label:44s} {value:6.3f} ms  {value / cpu_ms:6.1%}")
    return {
        "target": target,
        "backend": backend,
        "pool": pool,
        "concurrency": concurrency,
        "drain_rate": round(n / seconds, 1),
        "worker_cpu_ms_per_job": round(cpu_ms, 3),
        "cpu_ms_per_job_by_phase": per_job,
        "samples": shares,
    }


def main(args: argparse.Namespace) -> None:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results = []
    keep = Path(args.keep) if args.keep else None
    with Services() as services, interrupted_cleanly(services):
        stack = Stack(services, payments=args.n, warmup=0)
        for backend in backends:
            if args.mode == "cprofile":
                results.append(_profile_backend(stack, backend, args.n, keep))
            else:
                results.append(
                    _py_spy_target(
                        stack, "refundq", backend, args.n, args.pool, args.concurrency, keep
                    )
                )
        if args.mode == "py-spy":
            results.append(
                _py_spy_target(stack, "baseline", None, args.n, args.pool, args.concurrency, keep)
            )
    save_result(
        args.json,
        f"profile-{args.mode}",
        {"command": "profile", "mode": args.mode, "machine": machine(), "results": results},
    )
