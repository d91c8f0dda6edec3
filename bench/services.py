"""The parts of a benchmark stack, each started by the bench and cleaned up by it: a private
`redis-server`, the sandbox as a process of its own, SQLite files and PostgreSQL databases
(created from a migrated template, dropped at the end), and `celery worker`/`beat` processes.

Every process is started in a session of its own and killed by its process group id at the end
(`Services.close`, also on Ctrl-C): nothing the bench started outlives it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO, python

POSTGRES_ADMIN_URL = os.environ.get(
    "REFUNDQ_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Spawned:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL if it lingers."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


@dataclass
class Services:
    """Owns everything one bench invocation starts."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="refundq-bench-")))
    spawned: list[Spawned] = field(default_factory=list)
    postgres_databases: list[str] = field(default_factory=list)
    keep_workdir: bool = False

    # ---- processes --------------------------------------------------------------------------
    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> Spawned:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as handle:
            popen = subprocess.Popen(
                argv,
                cwd=cwd or self.workdir,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = Spawned(name, popen, log_path)
        self.spawned.append(process)
        return process

    def stop(self, process: Spawned) -> None:
        process.stop()
        if process in self.spawned:
            self.spawned.remove(process)

    def close(self) -> None:
        for process in reversed(self.spawned):
            process.stop(grace=5)
        self.spawned.clear()
        for name in self.postgres_databases:
            with contextlib.suppress(Exception):
                drop_postgres_database(name)
        self.postgres_databases.clear()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- Redis --------------------------------------------------------------------------------
    def start_redis(self) -> Redis:
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server not found (Debian: apt-get install redis-server)")
        port = free_port()
        directory = self.workdir / "redis"
        directory.mkdir(exist_ok=True)
        process = self.spawn(
            "redis",
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
                "--databases",
                "1000",
                "--dir",
                str(directory),
            ],
            os.environ.copy(),
        )
        redis = Redis(port, process)
        wait_for(redis.pings, 15, "redis-server")
        return redis

    # ---- the sandbox ----------------------------------------------------------------------------
    def start_sandbox(self, **config: str) -> Sandbox:
        from sandbox.keys import generate_bbmsl_keypair

        keys = self.workdir / f"sandbox-keys-{uuid.uuid4().hex[:6]}"
        keys.mkdir()
        private_key, public_key = generate_bbmsl_keypair(keys)
        port = free_port()
        env = {
            **os.environ,
            **{f"REFUNDQ_SANDBOX_{k.upper()}": v for k, v in config.items()},
            "PYTHONPATH": str(REPO),
        }
        process = self.spawn(
            "sandbox",
            [
                python(),
                "-m",
                "sandbox",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--bbmsl-public-key-file",
                str(public_key),
            ],
            env,
            cwd=REPO,
        )
        sandbox = Sandbox(f"http://127.0.0.1:{port}", process, private_key)
        wait_for(sandbox.answers, 30, "the sandbox")
        return sandbox

    # ---- databases -------------------------------------------------------------------------------
    def sqlite_template(self) -> Path:
        template = self.workdir / "template.db"
        if not template.exists():
            migrate(f"sqlite:///{template}")
        return template

    def new_sqlite(self, name: str) -> str:
        target = self.workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(self.sqlite_template(), target)
        return f"sqlite:///{target}"

    def postgres_template(self) -> str:
        if not hasattr(self, "_pg_template"):
            name = create_postgres_database()
            self.postgres_databases.append(name)
            migrate(postgres_url(name))
            self._pg_template = name
        return self._pg_template

    def new_postgres(self) -> str:
        name = create_postgres_database(template=self.postgres_template())
        self.postgres_databases.insert(0, name)  # dropped before the template
        return postgres_url(name)

    def new_database(self, backend: str, name: str) -> str:
        return self.new_sqlite(name) if backend == "sqlite" else self.new_postgres()

    def drop_database(self, url: str) -> None:
        """Done with a run's database: drop it (PostgreSQL) or delete it (SQLite)."""
        if url.startswith("sqlite"):
            path = url.removeprefix("sqlite:///")
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
        name = url.rsplit("/", 1)[1]
        drop_postgres_database(name)
        if name in self.postgres_databases:
            self.postgres_databases.remove(name)


@dataclass
class Redis:
    port: int
    process: Spawned

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(port=self.port, db=db)

    def pings(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False


@dataclass
class Sandbox:
    base_url: str
    process: Spawned
    bbmsl_private_key: Path

    def answers(self) -> bool:
        try:
            return httpx.get(self.base_url + "/_admin/faults", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def env(self) -> dict[str, str]:
        from sandbox.config import SandboxConfig
        from sandbox.serve import env_lines

        lines = env_lines(self.base_url, SandboxConfig(), self.bbmsl_private_key)
        return dict(line.split("=", 1) for line in lines)

    def create_payments(self, gateway: str, refs: list[str], amount: str, currency: str) -> None:
        """Register the payments the jobs refund (one admin call each, on one connection)."""
        with httpx.Client(base_url=self.base_url + "/_admin", timeout=30) as client:
            for ref in refs:
                answer = client.post(
                    f"/{gateway}/payments",
                    json={"payment_ref": ref, "amount": amount, "currency": currency},
                )
                if answer.status_code not in (201, 409):
                    raise RuntimeError(f"sandbox refused payment {ref}: {answer.text}")

    def add_latency(self, gateway: str, latency_ms: int) -> None:
        """Every call to `gateway` answers `latency_ms` later (a real gateway's round trip)."""
        answer = httpx.post(
            self.base_url + "/_admin/faults",
            json={"gateway": gateway, "kind": "latency", "latency_ms": latency_ms},
            timeout=10,
        )
        if answer.status_code != 201:
            raise RuntimeError(f"sandbox refused the latency fault: {answer.text}")

    def calls(self, gateway: str, endpoint: str | None = None) -> list[dict[str, Any]]:
        params = {"gateway": gateway, **({"endpoint": endpoint} if endpoint else {})}
        answer = httpx.get(self.base_url + "/_admin/calls", params=params, timeout=120)
        answer.raise_for_status()
        return list(answer.json()["calls"])

    def reset(self) -> None:
        httpx.post(self.base_url + "/_admin/reset", json={}, timeout=30).raise_for_status()


# ---- PostgreSQL and migrations ---------------------------------------------------------------


def postgres_url(name: str) -> str:
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def _admin() -> Any:
    import psycopg

    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)


def postgres_version() -> str:
    try:
        with _admin() as connection:
            row = connection.execute("show server_version").fetchone()
            return str(row[0]) if row else "?"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def create_postgres_database(template: str | None = None) -> str:
    name = f"refundq_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _admin() as connection:
        suffix = f' TEMPLATE "{template}"' if template else ""
        connection.execute(f'CREATE DATABASE "{name}"{suffix}')
    return name


def drop_postgres_database(name: str) -> None:
    with _admin() as connection:
        connection.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s", (name,)
        )
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')


def migrate(url: str) -> None:
    """The schema, exactly as `refundq db upgrade` makes it (a subprocess: this process keeps
    no engine of refundq's)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "REFUNDQ_DATABASE_URL": url}
    subprocess.run(
        [python(), "-c", "from worker.migrate import upgrade; upgrade()"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )


# ---- workers --------------------------------------------------------------------------------


def child_env(base: dict[str, str], code: Path | None = None) -> dict[str, str]:
    """The environment of a refundq (or baseline) process: ours without REFUNDQ_*, plus `base`.
    `code`: run refundq from another checkout (a before/after comparison); `bench` itself
    still comes from this one."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDQ_")}
    path = f"{code}:{REPO}" if code is not None else str(REPO)
    return {**inherited, **base, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def worker_argv(
    app: str, pool: str, concurrency: int, name: str, loglevel: str = "INFO"
) -> list[str]:
    """The Procfile's worker command line, with the pool and concurrency under test."""
    return [
        python(),
        "-m",
        "celery",
        "-A",
        app,
        "--quiet",
        "worker",
        "--loglevel",
        loglevel,
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}@%h",
        "--without-mingle",
        "--without-gossip",
    ]


def beat_argv(workdir: Path) -> list[str]:
    return [
        python(),
        "-m",
        "celery",
        "-A",
        "worker.app",
        "--quiet",
        "beat",
        "--loglevel",
        "INFO",
        "--schedule",
        str(workdir / f"beat-{uuid.uuid4().hex[:6]}"),
    ]


def wait_ready(processes: list[Spawned], marker: str = "ready.", timeout: float = 60) -> None:
    def ready() -> bool:
        for process in processes:
            if not process.alive():
                raise RuntimeError(f"{process.name} died at start:\n{process.log()[-3000:]}")
        return all(marker in p.log() for p in processes)

    wait_for(ready, timeout, "workers to be ready")


@contextlib.contextmanager
def interrupted_cleanly(services: Services) -> Iterator[None]:
    """Ctrl-C or SIGTERM: stop what we started before exiting."""

    def handler(signum: int, _frame: object) -> None:
        services.close()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt:
        services.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
