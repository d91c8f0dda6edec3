"""A `celery worker` under cProfile, counting SQL statements and commits: what `python -m bench
profile` runs (with `--pool solo`, so every task runs in this one profiled process).

    python -m bench.profiled_worker OUT.prof COUNTS.json -- -A worker.app worker --pool solo …

On SIGTERM (a warm shutdown) the profile and the counts are written.
"""

from __future__ import annotations

import cProfile
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def main() -> None:
    out, counts_path, separator, *celery_argv = sys.argv[1:]
    assert separator == "--", "usage: profiled_worker OUT.prof COUNTS.json -- <celery argv>"
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counts: Counter[str] = Counter()

    def count(statement: str) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        counts[f"statement:{verb}"] += 1

    @event.listens_for(Engine, "before_cursor_execute")
    def _statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        count(statement)

    # The hot path's statements run on the driver, past SQLAlchemy's cursor events
    # (worker/driver.py): counted where the driver runs them.
    from worker import driver

    run_on_driver = driver._run

    def _on_driver(connection: Any, plan: Any, params: Any) -> Any:
        count(plan.sql)
        return run_on_driver(connection, plan, params)

    driver._run = _on_driver

    @event.listens_for(Engine, "commit")
    def _commit(_conn: Any) -> None:
        counts["commit"] += 1

    @event.listens_for(Engine, "rollback")
    def _rollback(_conn: Any) -> None:
        counts["rollback"] += 1

    @event.listens_for(Engine, "checkout")
    def _checkout(*_args: Any) -> None:
        counts["pool_checkout"] += 1

    from celery.bin.celery import main as celery_main

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    sys.argv = ["celery", *celery_argv]
    try:
        celery_main()
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(out)
        counts["wall_seconds_x1000"] = int((time.perf_counter() - started) * 1000)
        Path(counts_path).write_text(json.dumps(dict(counts)))


if __name__ == "__main__":
    main()
