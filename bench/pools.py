"""`python -m bench pools`: which worker pool and concurrency serve refundq's gateway calls
best — prefork against threads (and gevent, when it is installed) at a few concurrencies, each
with a burst of N refunds (throughput, enqueue->final latency) and optionally a paced run
(service latency at a steady load). The configurations are interleaved round by round.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from bench.common import machine, median_and_spread, save_result, say
from bench.services import Services, interrupted_cleanly, postgres_version
from bench.stack import RunConfig, Stack, run_once

DEFAULT_CONFIGS = "prefork:2,prefork:4,prefork:8,threads:4,threads:8,threads:16,gevent:16,gevent:64"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help=f"pool:concurrency,... ({DEFAULT_CONFIGS})"
    )
    parser.add_argument("--n", type=int, default=3000, help="refunds per burst (3000)")
    parser.add_argument("--backends", default="sqlite,postgres", help="(sqlite,postgres)")
    parser.add_argument("--rounds", type=int, default=2, help="(2)")
    parser.add_argument("--paced-rate", type=float, default=0.0, help="jobs/s; 0 skips (0)")
    parser.add_argument("--paced-n", type=int, default=1000, help="(1000)")
    parser.add_argument("--baseline", action="store_true", help="also run the bare-Celery baseline")
    parser.add_argument(
        "--latency-ms",
        type=int,
        default=0,
        help="the sandbox answers every call this much later, as a real gateway does (0)",
    )
    parser.add_argument("--json", type=str, default=None)


def main(args: argparse.Namespace) -> None:
    configs = []
    for item in args.configs.split(","):
        pool, _, concurrency = item.partition(":")
        if pool == "gevent" and importlib.util.find_spec("gevent") is None:
            say(f"  skipping {item}: gevent is not installed")
            continue
        configs.append((pool, int(concurrency)))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    targets = [*backends, *(["baseline"] if args.baseline else [])]
    info = machine()
    info["versions"]["postgresql"] = postgres_version()
    runs: dict[str, list[dict[str, Any]]] = {}
    with Services() as services, interrupted_cleanly(services):
        stack = Stack(services, payments=max(args.n, args.paced_n))
        if args.latency_ms:
            stack.sandbox.add_latency("vai247", args.latency_ms)
        for round_number in range(args.rounds):
            order = configs if round_number % 2 == 0 else list(reversed(configs))
            say(f"round {round_number + 1}/{args.rounds}")
            for pool, concurrency in order:
                for target in targets:
                    key = f"{target} {pool}x{concurrency}"
                    base = {
                        "target": "baseline" if target == "baseline" else "refundq",
                        "backend": None if target == "baseline" else target,
                        "pool": pool,
                        "concurrency": concurrency,
                    }
                    burst = run_once(stack, RunConfig(n=args.n, **base))
                    entry = {"burst": burst}
                    if args.paced_rate:
                        entry["paced"] = run_once(
                            stack, RunConfig(n=args.paced_n, rate=args.paced_rate, **base)
                        )
                    runs.setdefault(key, []).append(entry)
    summary = {}
    say("\nsummary (medians over rounds)")
    for key, entries in runs.items():
        row: dict[str, Any] = {
            "throughput": median_and_spread(e["burst"]["throughput"] for e in entries),
            "burst_p99_ms": median_and_spread(e["burst"]["latency"]["p99_ms"] for e in entries),
            "cpu_ms_per_job": median_and_spread(
                e["burst"]["cpu_ms_per_job"]["total"] for e in entries
            ),
        }
        if args.paced_rate:
            row["paced_p50_ms"] = median_and_spread(
                e["paced"]["latency"]["p50_ms"] for e in entries
            )
            row["paced_p99_ms"] = median_and_spread(
                e["paced"]["latency"]["p99_ms"] for e in entries
            )
        summary[key] = row
        line = (
            f"  {key:28s} {row['throughput']['median']:7.1f} jobs/s "
            f"(spread {row['throughput']['spread']:.0%})  burst p99 "
            f"{row['burst_p99_ms']['median']:7.0f} ms  "
            f"cpu/job {row['cpu_ms_per_job']['median']:.2f} ms"
        )
        if args.paced_rate:
            line += (
                f"  paced p50 {row['paced_p50_ms']['median']:.1f} ms"
                f" p99 {row['paced_p99_ms']['median']:.1f} ms"
            )
        say(line)
    save_result(
        args.json,
        "pools",
        {
            "command": "pools",
            "machine": info,
            "settings": {
                "configs": configs,
                "n": args.n,
                "backends": backends,
                "rounds": args.rounds,
                "paced_rate": args.paced_rate,
                "paced_n": args.paced_n,
                "latency_ms": args.latency_ms,
            },
            "summary": summary,
            "runs": runs,
        },
    )
