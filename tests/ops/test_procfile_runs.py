"""`honcho start` with the repository's Procfile, pointed at the test stack's Redis database and
database: all five processes come up (web answers /healthz, the worker is ready and refunds a
job, beat ticks, Flower and the sandbox answer), and one SIGTERM stops them all without
anything having to be killed."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import sys

from tests.ops.support import (
    PROCESSES,
    PROCFILE,
    prepare_app_root,
    process_env,
    wait_http_ok,
)
from tests.support.polling import wait_for
from tests.support.services import free_ports
from tests.support.stack import unique
from worker.client import enqueue_refund

_STARTED = re.compile(r"(\w+)\.1 started \(pid=(\d+)\)")


def _lines_of(log: str, process: str) -> list[str]:
    """Honcho's output for one process: `HH:MM:SS <name>.1 | <line>`."""
    return [
        line.split("| ", 1)[1]
        for line in log.splitlines()
        if re.match(rf"^\S+ {process}\.1\s+\| ", line)
    ]


def test_honcho_runs_the_five_processes_and_stops_them_cleanly(stack_factory):
    # Given a stack (its Redis DB and database) and free ports for honcho's processes
    stack = stack_factory()
    app_root = prepare_app_root(stack.workdir)
    base_port, flower_port, sandbox_port = free_ports(3)
    env = process_env(
        stack,
        REFUNDQ_FLOWER_BASIC_AUTH=f"ops:{secrets.token_hex(8)}",
        REFUNDQ_FLOWER_PORT=str(flower_port),
        REFUNDQ_SANDBOX_PORT=str(sandbox_port),
    )
    env.pop("PORT", None)
    argv = [
        sys.executable,
        "-m",
        "honcho",
        "start",
        "--no-colour",
        "-f",
        str(PROCFILE),
        "-d",
        str(app_root),
        "-e",
        ".env",  # none in the app root: the environment is the stack's
        "-p",
        str(base_port),  # web's $PORT
    ]
    honcho = stack.spawn("honcho", argv, env)
    children: dict[str, int] = {}
    try:
        # When honcho starts the Procfile
        def all_started() -> bool:
            children.update((n, int(p)) for n, p in _STARTED.findall(honcho.log()))
            assert honcho.alive(), f"honcho exited:\n{honcho.log()[-4000:]}"
            return set(children) == set(PROCESSES)

        wait_for(all_started, timeout=30, message=lambda: f"honcho to start:\n{honcho.log()}")

        # Then web answers, the worker is ready, beat ticks, Flower and the sandbox answer
        wait_http_ok(f"http://127.0.0.1:{base_port}/healthz", honcho, timeout=60)
        wait_for(
            lambda: any("ready." in line for line in _lines_of(honcho.log(), "worker")),
            timeout=60,
            message=lambda: f"the worker to be ready:\n{honcho.log()[-4000:]}",
        )
        wait_for(
            lambda: any("beat: Starting" in line for line in _lines_of(honcho.log(), "beat")),
            timeout=30,
            message=lambda: f"beat to start:\n{honcho.log()[-4000:]}",
        )
        # beat keeps its schedule in memory: no shelve file where it runs
        assert not list(app_root.glob("celerybeat-schedule*"))
        wait_http_ok(f"http://127.0.0.1:{flower_port}/healthcheck", honcho)
        wait_http_ok(f"http://127.0.0.1:{sandbox_port}/_admin/faults", honcho)
        # ...and the worker does its job (here against the test suite's sandbox).
        ref = unique("vai247")
        stack.sandbox.create_payment("vai247", ref, "10.00", "USD")
        job = enqueue_refund(
            provider="vai247",
            payment_ref=ref,
            amount="10.00",
            currency="USD",
            idempotency_key=unique("k"),
        )
        done = stack.wait_status(job.id, {"succeeded", "declined", "failed", "unknown"})
        assert done.status == "succeeded", honcho.log()[-4000:]

        # When honcho is told to stop
        os.kill(honcho.popen.pid, signal.SIGTERM)
        honcho.popen.wait(timeout=30)

        # Then every process stopped on its own (nothing needed SIGKILL), with its children.
        log = honcho.log()
        assert "SIGTERM received" in log
        assert "sending SIGKILL" not in log, log[-4000:]
        for name in PROCESSES:
            # uvicorn (web, sandbox) shuts down gracefully, then re-raises the signal it caught,
            # as a process stopped by SIGTERM should: rc -15. Celery and Flower exit 0.
            rc = -signal.SIGTERM if name in ("web", "sandbox") else 0
            assert f"{name}.1 stopped (rc={rc})" in log, (
                f"{name} did not stop cleanly:\n"
                + "\n".join(_lines_of(log, "system") + _lines_of(log, name)[-30:])
            )
        assert any("Finished server process" in line for line in _lines_of(log, "web"))
        wait_for(
            lambda: not [n for n, pid in children.items() if _group_alive(pid)],
            timeout=10,
            message=lambda: f"{[n for n, p in children.items() if _group_alive(p)]} to be gone",
        )
    finally:
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
