"""`python -m bench <command> [--help]`: refundq's benchmarks (issue 7). See BENCHMARKS.md.

Commands:
  throughput  N refunds end to end on SQLite and PostgreSQL vs a bare-Celery baseline (A/B)
  polling     cost of one settlement-polling tick with 1,000 vs 100,000 jobs waiting
  memory      worker resident memory over 20,000 jobs
  ratelimit   a shared per-gateway rate limit under load, checked against the sandbox's call log
  pools       prefork vs threads vs gevent at a few concurrencies
  profile     where one job's time goes (cProfile of a solo worker, statement counts)
  writes      refundq's own database work per job in one process (enqueue, claim, outcome)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    from bench import memory, polling, pools, profile, ratelimit, throughput, writes

    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="refundq benchmarks; each prints its figures and writes a JSON file "
        "(default under bench-results/).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (
        ("throughput", throughput),
        ("polling", polling),
        ("memory", memory),
        ("ratelimit", ratelimit),
        ("pools", pools),
        ("profile", profile),
        ("writes", writes),
    ):
        doc = (module.__doc__ or "").strip()
        sub = commands.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
