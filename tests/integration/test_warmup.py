"""A worker's parent rehearses a job's turn and beat's reads before it forks its pool (issue 7):
its pool processes start with every statement of a turn compiled, and the rehearsal leaves
nothing behind. Real worker, real database (SQLite and PostgreSQL), real fork."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from sqlalchemy import func, select

from tests.support.stack import REPO, Stack
from worker.db import read_session
from worker.models import Attempt, Event, Job
from worker.warmup import REHEARSAL_PROVIDER

# Runs in a fresh interpreter: rehearse (or not), fork, and in the child run a job's turn and
# beat's reads as a pool process would, reporting each statement SQLAlchemy had to compile.
CHILD_TURN = textwrap.dedent(
    """
    import json, os, sys
    from sqlalchemy import event
    from sqlalchemy.engine.default import CACHE_MISS
    from providers.base import Capabilities, GatewayResult, Kind, Outcome
    from worker import db, driver, jobs, notify, warmup
    from worker.clock import utcnow

    rehearsed = warmup.rehearse() if sys.argv[1] == "rehearse" else None
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        report = json.loads(os.fdopen(read).read())
        os.waitpid(pid, 0)
        print(json.dumps({"rehearsed": rehearsed, **report}))
        sys.exit(0)
    os.close(read)
    db.reset_after_fork()  # what worker_process_init does
    compiled = []
    event.listen(
        db.get_engine(),
        "after_cursor_execute",
        lambda c, cur, sql, p, context, many: context.cache_hit is CACHE_MISS
        and compiled.append(" ".join(sql.split()[:3])),
    )
    plans_before = driver.plan_count()  # SQLite's hot path compiles for the driver
    job_id = sys.argv[2]
    claim, attempt = jobs.claim_job(job_id, "child", 60, first_call=lambda c: ("send", {}))
    caps = Capabilities(kinds=frozenset(Kind), status_query=False, resend_safe=False)
    answer = GatewayResult(Outcome.SUCCEEDED, provider_reference="r1", raw_status="ok")
    jobs.apply(
        claim, attempt, jobs.decide_result(claim, caps, answer, (60.0,), 3600.0),
        attempt_outcome="succeeded", http_status=200, code=None, message=None, duration_ms=1.0,
    )
    now = utcnow()
    jobs.due_for_dispatch(now, now, 10)
    jobs.expired_leases(now, 10)
    jobs.due_polls(now, 10)
    notify.due_notifications(now, now, 10)
    with os.fdopen(write, "w") as out:
        plans = driver.plan_count() - plans_before
        out.write(json.dumps({"compiled": compiled, "driver_plans": plans}))
    os._exit(0)
    """
)


def child_turn(stack: Stack, job_id: str, *, rehearse: bool) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD_TURN, "rehearse" if rehearse else "cold", job_id],
        env=stack.child_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def counts() -> tuple[int, int, int]:
    with read_session() as session:
        return tuple(  # type: ignore[return-value]
            session.execute(select(func.count()).select_from(model)).scalar_one()
            for model in (Job, Event, Attempt)
        )


def test_a_pool_process_compiles_nothing_for_its_first_turn_after_a_rehearsal(stack_factory):
    stack: Stack = stack_factory()
    cold_job, warm_job = stack.refund_new_order(), stack.refund_new_order()

    cold = child_turn(stack, cold_job, rehearse=False)
    warm = child_turn(stack, warm_job, rehearse=True)

    # The control: without it, everything compiles (on SQLite, the turn's writes for the
    # driver, worker/driver.py; the beat's reads for SQLAlchemy).
    assert len(cold["compiled"]) + cold["driver_plans"] >= 6, cold
    assert warm == {"rehearsed": True, "compiled": [], "driver_plans": 0}


def test_a_worker_rehearses_before_forking_and_the_rehearsal_leaves_nothing(stack_factory):
    stack: Stack = stack_factory()
    before = counts()

    worker = stack.start_worker()

    assert '"event": "warmup.done"' in worker.log()
    assert counts() == before
    with read_session() as session:
        assert (
            session.execute(
                select(func.count()).select_from(Job).where(Job.provider == REHEARSAL_PROVIDER)
            ).scalar_one()
            == 0
        )
    # Its pool processes, built on the rehearsed engine, do real work.
    done = stack.wait_status(stack.refund_new_order(), {"succeeded", "declined", "failed"})
    assert done.status == "succeeded"
