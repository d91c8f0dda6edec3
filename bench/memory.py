"""`python -m bench memory`: a worker's resident memory over 20,000 jobs (start, peak, end),
and its growth between 5,000 and 20,000 jobs done (a leak shows as steady growth; warming up —
imports, pools, caches — shows in the first thousands and then stops).

The worker runs with the pool and concurrency under test (default: the Procfile's) and is sampled
every 0.25 s from /proc: RSS and PSS (proportional set size: shared pages split between the
processes that share them, so the sum over a prefork pool is not inflated) of the worker's whole
process tree.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import (
    machine,
    process_tree,
    procfile_worker,
    rss_bytes,
    save_result,
    say,
)
from bench.services import Services, interrupted_cleanly
from bench.stack import Run, RunConfig, Stack, run_once

MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=20000, help="jobs (20000)")
    parser.add_argument("--checkpoint", type=int, default=5000, help="growth measured from (5000)")
    parser.add_argument("--backend", default="sqlite", help="sqlite | postgres (sqlite)")
    parser.add_argument("--pool", default=None, help="pool (default: the Procfile's)")
    parser.add_argument("--concurrency", type=int, default=None, help="(default: the Procfile's)")
    parser.add_argument(
        "--rate", type=float, default=None, help="offered load, jobs/s (default: flat out)"
    )
    parser.add_argument("--json", type=str, default=None)


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(args: argparse.Namespace) -> None:
    default_pool, default_concurrency = procfile_worker()
    pool = args.pool or default_pool
    concurrency = args.concurrency or default_concurrency
    info = machine()
    say(f"memory: {args.n} jobs, {args.backend}, {pool}x{concurrency}")
    samples: list[dict[str, Any]] = []

    def sample(run: Run, done: int) -> None:
        pids = [p for w in run.worker_pids() for p in process_tree(w)]
        samples.append(
            {
                "done": done,
                "rss": sum(rss_bytes(p) for p in pids),
                "pss": sum(pss_bytes(p) for p in pids),
                "rss_largest_process": max((rss_bytes(p) for p in pids), default=0),
                "processes": len(pids),
            }
        )

    config = RunConfig(
        target="refundq",
        backend=args.backend,
        n=args.n,
        pool=pool,
        concurrency=concurrency,
        rate=args.rate,
    )
    with Services() as services, interrupted_cleanly(services):
        stack = Stack(services, payments=args.n)
        figures = run_once(stack, config, on_tick=sample)
    warm = 50  # run_once's warm-up jobs are counted as done too
    start = samples[0]
    at_checkpoint = next(s for s in samples if s["done"] - warm >= args.checkpoint)
    end = samples[-1]
    peak = max(samples, key=lambda s: s["rss"])
    growth = {
        key: round((end[key] - at_checkpoint[key]) / at_checkpoint[key], 4)
        for key in ("rss", "pss", "rss_largest_process")
    }

    def mib(sample_: dict[str, Any]) -> dict[str, Any]:
        return {
            "done": sample_["done"] - warm,
            "rss_mib": round(sample_["rss"] / MIB, 1),
            "pss_mib": round(sample_["pss"] / MIB, 1),
            "rss_largest_process_mib": round(sample_["rss_largest_process"] / MIB, 1),
        }

    summary = {
        "start": mib(start),
        "checkpoint": mib(at_checkpoint),
        "peak": mib(peak),
        "end": mib(end),
        "growth_checkpoint_to_end": growth,
    }
    for name in ("start", "checkpoint", "peak", "end"):
        entry = summary[name]
        say(
            f"  {name:10s} after {entry['done']:6d} jobs: RSS {entry['rss_mib']:7.1f} MiB, "
            f"PSS {entry['pss_mib']:7.1f} MiB, "
            f"largest process {entry['rss_largest_process_mib']:6.1f} MiB"
        )
    say(
        f"  growth {args.checkpoint} -> {args.n} jobs: RSS {growth['rss']:+.1%}, "
        f"PSS {growth['pss']:+.1%}, largest process {growth['rss_largest_process']:+.1%}"
    )
    thinned = samples[:: max(1, len(samples) // 400)]
    save_result(
        args.json,
        "memory",
        {
            "command": "memory",
            "machine": info,
            "settings": {
                "n": args.n,
                "backend": args.backend,
                "pool": pool,
                "concurrency": concurrency,
                "rate": args.rate,
            },
            "summary": summary,
            "run": figures,
            "samples": [mib(s) for s in thinned],
        },
    )
