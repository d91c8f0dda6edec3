"""A running refundq for integration tests: its own database (SQLite file or PostgreSQL
database), the private Redis, the sandbox, and real `celery worker` / `celery beat`
subprocesses. The test process itself is the producer, with the same settings."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.polling import wait_for
from tests.support.sandbox import SandboxAdmin
from tests.support.services import PostgresServer, RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
_REDIS_DBS = itertools.count(1)
_SPAWNED: list[subprocess.Popen[bytes]] = []


def register_spawned(popen: subprocess.Popen[bytes]) -> None:
    """Have `kill_everything_spawned` take care of a process started elsewhere."""
    _SPAWNED.append(popen)


def kill_everything_spawned() -> None:
    """Kill every process group the harness started that still runs."""
    for popen in _SPAWNED:
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=30)
    _SPAWNED.clear()


# Fast clocks for tests; the invariants `Settings` checks still hold (time limit < lease, HTTP
# timeouts < time limit). Long enough that a loaded 2-core CI machine does not trip them.
FAST_TIMING = {
    "REFUNDQ_LEASE_SECONDS": "6",
    "REFUNDQ_TASK_TIME_LIMIT_SECONDS": "5",
    "REFUNDQ_HTTP_TIMEOUT_SECONDS": "3",
    "REFUNDQ_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "REFUNDQ_RETRY_BASE_SECONDS": "0.2",
    "REFUNDQ_RETRY_FLOOR_SECONDS": "0.1",
    "REFUNDQ_RETRY_CAP_SECONDS": "2",
    "REFUNDQ_RETRY_PATIENCE_SECONDS": "0",
    "REFUNDQ_DISPATCH_INTERVAL_SECONDS": "0.5",
    "REFUNDQ_REAP_INTERVAL_SECONDS": "0.5",
    "REFUNDQ_POLL_INTERVAL_SECONDS": "0.5",
    "REFUNDQ_REDISPATCH_AFTER_SECONDS": "2",
    "REFUNDQ_POLL_SCHEDULE_SECONDS": "[0.5, 0.5, 1, 1, 2]",
    "REFUNDQ_LOG_LEVEL": "INFO",
}


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0  # where this process's output starts (a restarted name appends)
    ready_marker: str | Callable[[], bool] = ""

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as handle:
            handle.seek(self.log_offset)
            return handle.read().decode(errors="replace")

    def ready(self) -> bool:
        if callable(self.ready_marker):
            return self.ready_marker()
        return not self.ready_marker or self.ready_marker in self.log()

    def alive(self) -> bool:
        return self.popen.poll() is None


def migrated_sqlite_template(directory: Path) -> Path:
    """Run the migrations once into a file; stacks copy it (faster than migrating each)."""
    template = directory / "template.db"
    if not template.exists():
        from worker.migrate import upgrade

        upgrade(f"sqlite:///{template}")
        from worker.db import dispose_all

        dispose_all()
    return template


def migrated_postgres_template(server: PostgresServer) -> str:
    name = server.create_database()
    from worker.db import dispose_all
    from worker.migrate import upgrade

    upgrade(server.url_for(name))
    dispose_all()  # a template database must have no open connections
    return name


@dataclass
class Stack:
    backend: str
    database_url: str
    redis: RedisServer
    sandbox_env: dict[str, str]
    sandbox: SandboxAdmin
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    api_port: int = field(default_factory=free_port)
    redis_db: int = field(default_factory=lambda: next(_REDIS_DBS))
    _saved_env: dict[str, str | None] = field(default_factory=dict)

    def broker(self) -> Any:
        """A Redis client on this stack's broker database."""
        return self.redis.client(self.redis_db)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # --- environment ------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {
            "REFUNDQ_BROKER_URL": self.redis.url_for(self.redis_db),
            "REFUNDQ_DATABASE_URL": self.database_url,
            "REFUNDQ_WEBHOOK_SECRET": "test-webhook-secret",
            # Where the sandbox's vaultspay calls back: this stack's API (`start_api`).
            "REFUNDQ_VAULTSPAY_CALLBACK_BASE_URL": self.api_url,
            **FAST_TIMING,
            **self.sandbox_env,
            **self.extra_env,
        }

    def activate(self) -> None:
        """Point this (the producer's) process at the stack."""
        for name, value in self.env().items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value
        reset_process_state()

    def deactivate(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()
        reset_process_state()

    def child_env(self, **overrides: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDQ_")}
        return {**base, **self.env(), **overrides, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}

    # --- processes --------------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        ready: str | Callable[[], bool] = "",
    ) -> Process:
        log_path = self.workdir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        handle = log_path.open("ab")
        popen = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env=env or self.child_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        _SPAWNED.append(popen)
        process = Process(name, popen, log_path, offset, ready)
        self.processes.append(process)
        return process

    def start_worker(
        self,
        name: str = "w1",
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        wait: bool = True,
        **env: str,
    ) -> Process:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "--loglevel",
            "INFO",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@%h",
            "--without-mingle",
            "--without-gossip",
        ]
        process = self.spawn(name, argv, self.child_env(**env) if env else None, "ready.")
        if wait:
            self.wait_ready(process)
        return process

    def wait_ready(self, *processes: Process) -> None:
        """Wait until every process says it is ready (they start in parallel)."""
        wait_for(
            lambda: all(p.ready() or not p.alive() for p in processes),
            timeout=60,
            message=lambda: (
                "processes to be ready:\n"
                + "\n".join(f"==== {p.name}\n{p.log()[-2000:]}" for p in processes if not p.ready())
            ),
        )
        for p in processes:
            assert p.alive(), f"{p.name} died at start:\n{p.log()[-3000:]}"

    def start(
        self, *, workers: int = 1, concurrency: int = 2, beat: bool = True, api: bool = False
    ) -> list[Process]:
        """Start workers, beat (and the API) at once, then wait for all of them."""
        started = [
            self.start_worker(f"w{n + 1}", concurrency=concurrency, wait=False)
            for n in range(workers)
        ]
        if beat:
            started.append(self.start_beat(wait=False))
        if api:
            started.append(self.start_api(wait=False))
        self.wait_ready(*started)
        return started

    def start_beat(self, name: str = "beat", *, wait: bool = True, **env: str) -> Process:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "beat",
            "--loglevel",
            "INFO",
            "--max-interval",
            "1",
        ]
        process = self.spawn(name, argv, self.child_env(**env) if env else None, "beat: Starting")
        if wait:
            self.wait_ready(process)
        return process

    def start_api(self, name: str = "api", *, wait: bool = True, **env: str) -> Process:
        """The HTTP side (`uvicorn worker.api:app`) on this stack's API port."""
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "worker.api:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.api_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]

        def answers() -> bool:
            import httpx

            try:
                # Any answer means up: a healthz that finds the broker down takes ~2 s to say so.
                return httpx.get(self.api_url + "/healthz", timeout=5).status_code < 600
            except httpx.HTTPError:
                return False

        process = self.spawn(name, argv, self.child_env(**env) if env else None, answers)
        if wait:
            self.wait_ready(process)
        return process

    def kill(self, process: Process, sig: int = signal.SIGKILL) -> None:
        """Kill the process and its children (a prefork worker's pool) at once."""
        if process.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, sig)
        process.popen.wait(timeout=30)

    def stop(self, process: Process) -> None:
        self.kill(process, signal.SIGTERM)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.popen.pid, signal.SIGKILL)
                process.popen.wait(timeout=30)
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.log()[-4000:]}" for p in self.processes)

    # --- jobs --------------------------------------------------------------------------------
    def refund_new_order(self, amount: str = "5.00", original: str = "50.00") -> str:
        """Enqueue a USD vai247 refund of `amount` for a new completed sandbox payment; its id."""
        from worker.client import enqueue_refund

        ref = unique("ord")
        self.sandbox.create_payment("vai247", ref, original, "USD", status="completed")
        job = enqueue_refund(
            provider="vai247",
            payment_ref=ref,
            amount=amount,
            currency="USD",
            idempotency_key=unique("k"),
        )
        return job.id

    def wait_status(self, job_id: str, statuses: Iterable[str], timeout: float = 45.0) -> Any:
        from worker.client import get_job

        wanted = set(statuses)
        last: dict[str, Any] = {}

        def probe() -> Any:
            view = get_job(job_id)
            last["view"] = view
            return view if view.status in wanted else None

        return wait_for(
            probe,
            timeout=timeout,
            interval=0.1,
            message=lambda: (
                f"job {job_id} to reach {sorted(wanted)}; it is "
                f"{getattr(last.get('view'), 'status', '?')}\n{self.logs()}"
            ),
        )


def reset_process_state() -> None:
    """Forget settings, engines, HTTP clients and the broker connection of this process."""
    from worker import db, gateways
    from worker.app import configure
    from worker.settings import get_settings

    get_settings.cache_clear()
    db.dispose_all()
    gateways.reset()
    configure()


def copy_sqlite(template: Path, target: Path) -> str:
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


def unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns():x}"
