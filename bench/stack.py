"""One benchmark stack (Redis, sandbox, payments) and one measured run on it: start the
workers, warm them up, let the producer processes (one unless `--producers` says more) enqueue N
jobs, wait until every job is final, and read the figures from the database (refundq) or from
Redis (the baseline).

A run's figures:
* `enqueue_rate`: jobs/s the producer processes achieved together, from the first one's start
  to the last one's end (refundq: `enqueue_refund` returned; baseline: `send_task` returned).
* `throughput`: N / (last job finished - first job created). refundq: `created_at` and
  `finished_at`, both written by refundq in the database; baseline: the publish time the
  producer passed to the task and the time the task ended.
* `latency`: per job, enqueue -> final, p50/p95/p99/max.
* `cpu_ms_per_job`: CPU time each component spent per job, from /proc (the machine has two
  cores, so what costs CPU is what limits throughput), and `foreign_cpu_share`: the share of
  the machine's busy time spent by processes that are not part of the run (noise).
"""

from __future__ import annotations

import itertools
import json
import resource
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    cpu_seconds,
    latency_summary,
    load_average,
    machine_busy_seconds,
    pids_named,
    python,
    say,
    tree_cpu_seconds,
)
from bench.producer import CURRENCY, ORIGINAL_AMOUNT, module_args
from bench.services import (
    Redis,
    Sandbox,
    Services,
    Spawned,
    beat_argv,
    child_env,
    wait_ready,
    worker_argv,
)

PAYMENT_PREFIX = "pay-"
WARMUP_PREFIX = "warm-"
FINAL = ("succeeded", "declined", "failed", "unknown")


@dataclass
class RunConfig:
    target: str  # "refundq" | "baseline" | "floor" (bench/floor.py)
    n: int
    backend: str | None = None  # refundq: "sqlite" | "postgres"; the floor: "postgres"
    pool: str = "prefork"
    concurrency: int = 4
    workers: int = 1  # worker processes (each with `concurrency`)
    producers: int = 1  # producer processes, each enqueueing its share of `n`
    rate: float | None = None  # offered load, jobs/s; None: as fast as the producer can
    beat: bool = True
    warmup: int = 50
    extra_env: dict[str, str] = field(default_factory=dict)
    loglevel: str = "INFO"
    # Run refundq from another checkout (`--variant NAME=DIR`): before/after, side by side.
    variant: str | None = None
    code: Path | None = None

    def label(self) -> str:
        what = self.target if self.target == "baseline" else f"{self.target}/{self.backend}"
        if self.variant:
            what += f"@{self.variant}"
        load = f"@{self.rate:g}/s" if self.rate else "burst"
        return (
            f"{what} {self.pool}x{self.concurrency}"
            + (f"x{self.workers}w" if self.workers > 1 else "")
            + (f" {self.producers} producers" if self.producers > 1 else "")
            + f" n={self.n} {load}"
        )


class Stack:
    """Redis and the sandbox, started once; each run gets its own Redis database and its own
    refundq database. The sandbox holds enough payments for every run (each job refunds 1.00
    of a payment of 1,000,000.00, so runs can reuse payments)."""

    def __init__(self, services: Services, payments: int, warmup: int = 50) -> None:
        self.services = services
        self.redis: Redis = services.start_redis()
        self.sandbox: Sandbox = services.start_sandbox()
        self.payments = 0
        self.warmups = 0
        self._dbs = itertools.count(1)
        self.ensure_payments(payments, warmup)

    def ensure_payments(self, payments: int, warmup: int) -> None:
        if payments > self.payments:
            say(f"  creating {payments - self.payments} payments in the sandbox ...")
            refs = [f"{PAYMENT_PREFIX}{i}" for i in range(self.payments, payments)]
            self.sandbox.create_payments("vai247", refs, ORIGINAL_AMOUNT, CURRENCY)
            self.payments = payments
        if warmup > self.warmups:
            refs = [f"{WARMUP_PREFIX}{i}" for i in range(self.warmups, warmup)]
            self.sandbox.create_payments("vai247", refs, ORIGINAL_AMOUNT, CURRENCY)
            self.warmups = warmup

    def env(
        self, database_url: str | None, redis_db: int, code: Path | None = None, **extra: str
    ) -> dict[str, str]:
        base = {
            "REFUNDQ_BROKER_URL": self.redis.url(redis_db),
            "REFUNDQ_LOG_LEVEL": "INFO",
            **self.sandbox.env(),
            **extra,
        }
        if database_url:
            base["REFUNDQ_DATABASE_URL"] = database_url
        return child_env(base, code)

    def new_redis_db(self) -> int:
        db = next(self._dbs)
        self.redis.client(db).flushdb()
        return db


@dataclass
class Run:
    """A run in progress: its processes and how to read it."""

    config: RunConfig
    stack: Stack
    env: dict[str, str]
    redis_db: int
    database_url: str | None
    workers: list[Spawned] = field(default_factory=list)
    beat: Spawned | None = None
    _engine: Any = None

    # ---- processes ----------------------------------------------------------------------------
    def start(self) -> None:
        app = {"refundq": "worker.app", "baseline": "bench.baseline", "floor": "bench.floor"}[
            self.config.target
        ]
        for index in range(self.config.workers):
            argv = worker_argv(
                app,
                self.config.pool,
                self.config.concurrency,
                f"w{index + 1}",
                self.config.loglevel,
            )
            self.workers.append(self.stack.services.spawn(f"worker-{index + 1}", argv, self.env))
        if self.config.target == "refundq" and self.config.beat:
            self.beat = self.stack.services.spawn(
                "beat", beat_argv(self.stack.services.workdir), self.env
            )
        wait_ready(self.workers)

    def stop(self) -> None:
        for process in [*self.workers, *([self.beat] if self.beat else [])]:
            self.stack.services.stop(process)
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    # ---- producing ----------------------------------------------------------------------------
    def produce(
        self, n: int, prefix: str, run_key: str, rate: float | None, offset: int = 0
    ) -> subprocess.Popen[str]:
        argv = [python(), "-m", *module_args(self.config.target, n, prefix, run_key, rate)]
        if offset:
            argv += ["--offset", str(offset)]
        env = {**self.env, "REFUNDQ_LOG_LEVEL": "WARNING"}
        cwd = self.config.code or REPO
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)

    # ---- reading ------------------------------------------------------------------------------
    def engine(self) -> Any:
        if self._engine is None:
            from sqlalchemy import create_engine

            from worker.db import normalise_url

            assert self.database_url is not None
            self._engine = create_engine(normalise_url(self.database_url))
        return self._engine

    def done_count(self) -> int:
        if self.config.target == "baseline":
            from bench.baseline import RESULTS_KEY

            return int(self.stack.redis.client(self.redis_db).llen(RESULTS_KEY))
        from sqlalchemy import text

        from bench.floor import TEMPLATE_PREFIX

        # The floor's processes each record a template job first (bench/floor.py).
        with self.engine().connect() as connection:
            return int(
                connection.execute(
                    text(
                        "select count(*) from jobs where finished_at is not null"
                        " and id not like :template"
                    ),
                    {"template": f"{TEMPLATE_PREFIX}%"},
                ).scalar_one()
            )

    def wait_done(
        self, expected: int, timeout: float, on_tick: Callable[[int], None] | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = self.done_count()
            if on_tick is not None:
                on_tick(done)
            if done >= expected:
                return
            for process in self.workers:
                if not process.alive():
                    raise RuntimeError(f"{process.name} died:\n{process.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.config.label()}: {done}/{expected} done after {timeout:.0f}s\n"
                    + self.workers[0].log()[-3000:]
                )
            time.sleep(0.25)

    def refundq_timings(self, run_key: str) -> tuple[list[tuple[float, float]], Counter[str]]:
        from sqlalchemy import select
        from sqlmodel import col

        from worker.models import Job

        with self.engine().connect() as connection:
            rows = connection.execute(
                select(col(Job.created_at), col(Job.finished_at), col(Job.status)).where(
                    col(Job.idempotency_key).like(f"{run_key}-%")
                )
            ).all()
        pairs = [(r[0].timestamp(), r[1].timestamp()) for r in rows if r[1] is not None]
        return pairs, Counter(r[2] for r in rows)

    def baseline_timings(self) -> tuple[list[tuple[float, float]], Counter[str]]:
        from bench.baseline import RESULTS_KEY

        raw = self.stack.redis.client(self.redis_db).lrange(RESULTS_KEY, 0, -1)
        pairs, statuses = [], Counter[str]()
        for item in raw:
            published, finished, status = item.decode().split()
            pairs.append((float(published), float(finished)))
            statuses[f"http_{status}"] += 1
        return pairs, statuses


def run_once(
    stack: Stack,
    config: RunConfig,
    *,
    on_tick: Callable[[Run, int], None] | None = None,
    keep_database: bool = False,
) -> dict[str, Any]:
    """One measured run; returns its figures."""
    stack.ensure_payments(config.n, config.warmup)
    redis_db = stack.new_redis_db()
    database_url = None
    if config.target != "baseline":
        assert config.backend is not None
        database_url = stack.services.new_database(config.backend, f"run-{redis_db}")
    env = stack.env(database_url, redis_db, config.code, **config.extra_env)
    run = Run(config, stack, env, redis_db, database_url)
    load_before = load_average()
    try:
        run.start()
        if config.warmup:
            warm = run.produce(config.warmup, WARMUP_PREFIX, f"warm{redis_db}", None)
            warm.communicate(timeout=120)
            run.wait_done(config.warmup, timeout=120)
            if config.target == "baseline":
                from bench.baseline import RESULTS_KEY

                stack.redis.client(redis_db).delete(RESULTS_KEY)
        run_key = f"m{redis_db}"
        components = _component_pids(stack, run)
        cpu_before = {name: cpu() for name, cpu in components.items()}
        busy_before = machine_busy_seconds()
        own_before = _own_cpu()
        producers = _produce_shares(run, PAYMENT_PREFIX, run_key)
        expected = config.n + (config.warmup if config.target != "baseline" else 0)
        timeout = config.n / (config.rate or 20) + 180
        run.wait_done(expected, timeout, (lambda done: on_tick(run, done)) if on_tick else None)
        produced = combined(
            [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in producers]
        )
        cpu_after = {name: cpu() for name, cpu in components.items()}
        busy = machine_busy_seconds() - busy_before
        own = _own_cpu() - own_before
        if config.target != "baseline":
            pairs, statuses = run.refundq_timings(run_key)
        else:
            pairs, statuses = run.baseline_timings()
    finally:
        run.stop()
        if database_url and not keep_database:
            stack.services.drop_database(database_url)
    return _figures(
        config, produced, pairs, statuses, cpu_before, cpu_after, busy, own, load_before
    )


def _produce_shares(run: Run, prefix: str, run_key: str) -> list[subprocess.Popen[str]]:
    """`config.producers` producer processes at once, each with its own share of the payments
    and keys, and of the offered rate."""
    config = run.config
    rate = config.rate / config.producers if config.rate else None
    return [
        run.produce(count, prefix, run_key, rate, offset=offset)
        for count, offset in shares(config.n, config.producers)
    ]


def shares(n: int, producers: int) -> list[tuple[int, int]]:
    """(count, offset) of each producer's share of jobs 0..n-1: contiguous, as even as can be,
    none left out and none given twice (payment refs and idempotency keys are by index)."""
    if producers < 1:
        raise ValueError(f"at least one producer, not {producers}")
    counts = [n // producers + (1 if i < n % producers else 0) for i in range(producers)]
    return [(count, sum(counts[:i])) for i, count in enumerate(counts)]


def combined(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The producers' reports as one: jobs over the span from the first start to the last end,
    and their CPU summed."""
    start = min(r["first_wall"] for r in reports)
    end = max(r["first_wall"] + r["seconds"] for r in reports)
    n = sum(r["n"] for r in reports)
    return {
        "n": n,
        "seconds": end - start,
        "rate": n / (end - start) if end > start else 0.0,
        "first_wall": start,
        "cpu_seconds": sum(r["cpu_seconds"] for r in reports),
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _component_pids(stack: Stack, run: Run) -> dict[str, Callable[[], float]]:
    components: dict[str, Callable[[], float]] = {
        "worker": lambda: sum(tree_cpu_seconds(pid) for pid in run.worker_pids()),
        "sandbox": lambda: tree_cpu_seconds(stack.sandbox.process.pid),
        "redis": lambda: tree_cpu_seconds(stack.redis.process.pid),
    }
    if run.beat is not None:
        beat = run.beat
        components["beat"] = lambda: tree_cpu_seconds(beat.pid)
    if run.config.backend == "postgres":
        components["postgres"] = lambda: cpu_seconds(pids_named("postgres"))
    return components


def _figures(
    config: RunConfig,
    produced: dict[str, Any],
    pairs: list[tuple[float, float]],
    statuses: Counter[str],
    cpu_before: dict[str, float],
    cpu_after: dict[str, float],
    busy: float,
    own: float,
    load_before: float,
) -> dict[str, Any]:
    n = len(pairs)
    first = min(p[0] for p in pairs)
    last = max(p[1] for p in pairs)
    span = last - first
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    cpu["producer"] = produced["cpu_seconds"]
    ours = sum(cpu.values()) + own
    per_job = {name: round(seconds * 1000 / n, 3) for name, seconds in cpu.items()}
    per_job["total"] = round(sum(cpu.values()) * 1000 / n, 3)
    figures = {
        "label": config.label(),
        "target": config.target,
        "variant": config.variant,
        "backend": config.backend,
        "pool": config.pool,
        "concurrency": config.concurrency,
        "workers": config.workers,
        "offered_rate": config.rate,
        "n": n,
        "statuses": dict(statuses),
        "enqueue_rate": round(produced["rate"], 1),
        "throughput": round(n / span, 1),
        "seconds": round(span, 2),
        "latency": latency_summary([p[1] - p[0] for p in pairs]),
        "slowest_1pct_at": _slowest_positions(pairs),
        # Without the run's start (first connections of the producer and of each pool process).
        "latency_after_first_5pct": latency_summary(
            [f - c for c, f in sorted(pairs)[len(pairs) // 20 :]]
        ),
        "cpu_ms_per_job": per_job,
        "foreign_cpu_share": round(max(0.0, busy - ours) / busy, 3) if busy else 0.0,
        "loadavg_before": load_before,
    }
    lat = figures["latency"]
    say(
        f"  {config.label():48s} {figures['throughput']:7.1f} jobs/s  "
        f"enqueue {figures['enqueue_rate']:6.1f}/s  p50 {lat['p50_ms']:7.1f} ms  "
        f"p99 {lat['p99_ms']:8.1f} ms  cpu/job {per_job['total']:5.2f} ms  "
        f"foreign {figures['foreign_cpu_share']:.0%}  {dict(statuses)}"
    )
    return figures


def _slowest_positions(pairs: list[tuple[float, float]]) -> list[float]:
    """Where in the run (0 = first job enqueued, 1 = last) the slowest 1% of jobs were
    enqueued: clustered at 0, the tail is warm-up; spread out, it is something recurring."""
    if not pairs:
        return []
    ordered = sorted(pairs)
    count = max(1, len(ordered) // 100)
    slowest = sorted(range(len(ordered)), key=lambda i: ordered[i][0] - ordered[i][1])[:count]
    return sorted(round(i / len(ordered), 3) for i in slowest)
