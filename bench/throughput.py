"""`python -m bench throughput`: N refunds through the real path, on SQLite and on PostgreSQL,
against the bare-Celery baseline, interleaved (A/B, `--rounds` times, the order reversed every
other round) because identical runs on this machine differ by 25-30%.

Three measurements per round:
* burst: the producer enqueues N as fast as it can while the workers drain the queue (a shop
  cancelling an event): throughput, enqueue rate, and enqueue->final latency (which, in a burst,
  is mostly time spent waiting in the queue). `--producers K` splits N between K producer
  processes started together, for every system alike;
* paced (`--paced-rate`): a steady offered load below both systems' capacity, where
  enqueue->final latency is the service latency a single refund sees;
* enqueue alone: the producer with no worker running (one process, one thread).

`--floor` adds a third system on PostgreSQL: the baseline plus exactly the statements refundq
sends for a refund, and nothing else of refundq's (bench/floor.py). Its ratio to the baseline
is the most refundq can reach here while it keeps those statements.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    machine,
    median_and_spread,
    procfile_worker,
    python,
    save_result,
    say,
)
from bench.producer import module_args
from bench.services import Services, interrupted_cleanly, postgres_version
from bench.stack import PAYMENT_PREFIX, RunConfig, Stack, run_once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=5000, help="refunds per burst run (5000)")
    parser.add_argument(
        "--backends", default="sqlite,postgres", help="comma-separated (sqlite,postgres)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (2)")
    parser.add_argument("--pool", default=None, help="worker pool (default: the Procfile's)")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="worker concurrency (default: the Procfile's)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    parser.add_argument(
        "--producers",
        type=_at_least_one,
        default=1,
        help="producer processes in the burst and paced runs, each with its share of N (1)",
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=100.0,
        help="offered load (jobs/s) of the paced latency runs; 0 skips them (100)",
    )
    parser.add_argument("--paced-n", type=int, default=1500, help="jobs per paced run (1500)")
    parser.add_argument(
        "--enqueue-n", type=int, default=3000, help="jobs of the enqueue-alone run; 0 skips (3000)"
    )
    parser.add_argument("--no-beat", action="store_true", help="run without celery beat")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run refundq from the checkout in DIR (e.g. before=/tmp/before), interleaved",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run the floor on PostgreSQL: the baseline plus refundq's statements and "
        "nothing else (bench/floor.py), interleaved",
    )
    parser.add_argument("--json", type=str, default=None, help="result file (bench-results/…)")


def _at_least_one(text: str) -> int:
    """An argument that counts processes: refused before any service starts, not mid-run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def enqueue_alone(stack: Stack, config: RunConfig) -> dict[str, Any]:
    """One producer process, no worker: how fast `enqueue_refund` is on its own."""
    assert config.backend is not None
    backend, n = config.backend, config.n
    redis_db = stack.new_redis_db()
    database_url = stack.services.new_database(backend, f"enqueue-{redis_db}")
    env = {**stack.env(database_url, redis_db, config.code), "REFUNDQ_LOG_LEVEL": "WARNING"}
    try:
        output = subprocess.run(
            [python(), "-m", *module_args(config.target, n, PAYMENT_PREFIX, f"e{redis_db}")],
            cwd=config.code or REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        produced = json.loads(output.strip().splitlines()[-1])
    finally:
        stack.services.drop_database(database_url)
        stack.redis.client(redis_db).flushdb()
    rate = round(produced["rate"], 1)
    cpu = round(produced["cpu_seconds"] * 1000 / n, 3)
    name = config.label().split()[0]
    say(f"  enqueue alone, {name:16s} n={n}: {rate:7.1f} jobs/s  producer cpu/job {cpu} ms")
    return {"backend": backend, "variant": config.variant, "n": n, "enqueue_rate": rate,
            "producer_cpu_ms_per_job": cpu}  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    default_pool, default_concurrency = procfile_worker()
    args.pool = args.pool or default_pool
    args.concurrency = args.concurrency or default_concurrency
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    variants = dict(v.split("=", 1) for v in args.variant)
    targets = [*backends, *(f"{b}@{name}" for b in backends for name in variants)]
    if args.floor:
        targets.append("floor")
    info = machine()
    info["versions"]["postgresql"] = postgres_version()
    settings = {
        "n": args.n,
        "rounds": args.rounds,
        "pool": args.pool,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "producers": args.producers,
        "beat": not args.no_beat,
        "paced_rate": args.paced_rate,
        "paced_n": args.paced_n,
        "variants": variants,
        "floor": args.floor,
    }
    say(f"throughput: {settings} on {info['cores']} cores, load {info['loadavg_at_start']}")
    burst: dict[str, list[dict[str, Any]]] = {"baseline": [], **{t: [] for t in targets}}
    paced: dict[str, list[dict[str, Any]]] = {"baseline": [], **{t: [] for t in targets}}
    alone: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}

    def config(target: str, n: int, rate: float | None) -> RunConfig:
        backend, _, variant = target.partition("@")
        kind = target if target in ("baseline", "floor") else "refundq"
        return RunConfig(
            target=kind,
            backend={"baseline": None, "floor": "postgres"}.get(kind, backend),
            variant=variant or None,
            code=Path(variants[variant]) if variant else None,
            n=n,
            pool=args.pool,
            concurrency=args.concurrency,
            workers=args.workers,
            producers=args.producers,
            rate=rate,
            beat=not args.no_beat,
        )

    with Services() as services, interrupted_cleanly(services):
        stack = Stack(services, payments=max(args.n, args.paced_n, args.enqueue_n))
        for round_number in range(args.rounds):
            order = ["baseline", *targets]
            if round_number % 2:
                order.reverse()
            say(f"round {round_number + 1}/{args.rounds}: {' / '.join(order)}")
            for target in order:
                burst[target].append(run_once(stack, config(target, args.n, None)))
            if args.paced_rate:
                for target in order:
                    paced[target].append(
                        run_once(stack, config(target, args.paced_n, args.paced_rate))
                    )
            if args.enqueue_n:
                for target in targets:
                    alone[target].append(enqueue_alone(stack, config(target, args.enqueue_n, None)))
    summary = summarise(burst, paced, alone, targets)
    print_summary(summary)
    return {
        "command": "throughput",
        "machine": info,
        "settings": settings,
        "summary": summary,
        "runs": {"burst": burst, "paced": paced, "enqueue_alone": alone},
    }


def _stat(runs: list[dict[str, Any]], *path: str) -> dict[str, float]:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(float(value))
    return median_and_spread(values)


def summarise(
    burst: dict[str, list[dict[str, Any]]],
    paced: dict[str, list[dict[str, Any]]],
    alone: dict[str, list[dict[str, Any]]],
    targets: list[str],
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    base_tp = _stat(burst["baseline"], "throughput")
    base_p99 = _stat(burst["baseline"], "latency", "p99_ms")
    paced_base_p99 = _stat(paced["baseline"], "latency", "p99_ms") if paced["baseline"] else None
    summary["baseline"] = {
        "throughput": base_tp,
        "burst_p50_ms": _stat(burst["baseline"], "latency", "p50_ms"),
        "burst_p99_ms": base_p99,
        "enqueue_rate": _stat(burst["baseline"], "enqueue_rate"),
        "cpu_ms_per_job": _stat(burst["baseline"], "cpu_ms_per_job", "total"),
        **(
            {
                "paced_p50_ms": _stat(paced["baseline"], "latency", "p50_ms"),
                "paced_p99_ms": paced_base_p99,
            }
            if paced_base_p99
            else {}
        ),
    }
    for backend in targets:
        tp = _stat(burst[backend], "throughput")
        p99 = _stat(burst[backend], "latency", "p99_ms")
        entry: dict[str, Any] = {
            "throughput": tp,
            "throughput_ratio": round(tp["median"] / base_tp["median"], 3),
            "burst_p50_ms": _stat(burst[backend], "latency", "p50_ms"),
            "burst_p95_ms": _stat(burst[backend], "latency", "p95_ms"),
            "burst_p99_ms": p99,
            "burst_p99_ratio": round(p99["median"] / base_p99["median"], 3),
            "enqueue_rate_during_run": _stat(burst[backend], "enqueue_rate"),
            "cpu_ms_per_job": _stat(burst[backend], "cpu_ms_per_job", "total"),
        }
        if paced[backend] and paced_base_p99:
            paced_p99 = _stat(paced[backend], "latency", "p99_ms")
            entry.update(
                paced_p50_ms=_stat(paced[backend], "latency", "p50_ms"),
                paced_p95_ms=_stat(paced[backend], "latency", "p95_ms"),
                paced_p99_ms=paced_p99,
                paced_p99_ratio=round(paced_p99["median"] / paced_base_p99["median"], 3),
            )
        if alone.get(backend):
            entry["enqueue_rate_alone"] = _stat(alone[backend], "enqueue_rate")
        summary[backend] = entry
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    base = summary["baseline"]
    say("\nsummary (medians; spread = (max-min)/median)")
    say(
        f"  baseline                  {base['throughput']['median']:8.1f} jobs/s "
        f"(spread {base['throughput']['spread']:.0%})  "
        f"burst p99 {base['burst_p99_ms']['median']:.0f} ms"
        + (f"  paced p99 {base['paced_p99_ms']['median']:.1f} ms" if "paced_p99_ms" in base else "")
    )
    for backend, entry in summary.items():
        if backend == "baseline":
            continue
        name = backend if backend == "floor" else f"refundq/{backend}"
        line = (
            f"  {name:24s} {entry['throughput']['median']:8.1f} jobs/s "
            f"(spread {entry['throughput']['spread']:.0%})  ratio {entry['throughput_ratio']:.2f}"
            f"  burst p99 {entry['burst_p99_ms']['median']:.0f} ms "
            f"(x{entry['burst_p99_ratio']:.2f})"
        )
        if "paced_p99_ms" in entry:
            line += (
                f"  paced p99 {entry['paced_p99_ms']['median']:.1f} ms "
                f"(x{entry['paced_p99_ratio']:.2f})"
            )
        if "enqueue_rate_alone" in entry:
            line += f"  enqueue alone {entry['enqueue_rate_alone']['median']:.0f}/s"
        say(line)


def main(args: argparse.Namespace) -> None:
    result = measure(args)
    save_result(args.json, "throughput", result)
