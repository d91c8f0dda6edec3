"""Private service instances for the tests: a Redis server on a free port, a PostgreSQL
database of our own on the local server. Runs never disturb each other or a developer's data."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis

from tests.support.polling import wait_for


def _port_range() -> range:
    """Ports this test process hands out: below the kernel's ephemeral range (32768+), so no
    outgoing connection takes one, and a range of its own per pytest-xdist worker, so two
    workers never pick the same port between choosing it and binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = 4000
    start = 12000 + (index % 5) * width
    return range(start, start + width)


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never handed out twice by this process."""
    ports = _port_range()
    for _ in range(200):
        port = random.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {ports}")


def free_ports(count: int) -> list[int]:
    return [free_port() for _ in range(count)]


class RedisServer:
    """`redis-server` on a free loopback port, no persistence; can be stopped and restarted on
    the same port (chaos tests)."""

    def __init__(self, directory: Path) -> None:
        binary = os.environ.get("REFUNDQ_TEST_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            raise RuntimeError(
                "redis-server not found: install it (Debian: apt-get install redis-server) "
                "or set REFUNDQ_TEST_REDIS_SERVER; .ci/run does this for you"
            )
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                # One logical database per test stack: a message a dying process of one test
                # publishes can never reach the next test's workers.
                "--databases",
                "10000",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._pings, timeout=15, message=f"redis-server on port {self.port}")

    def _pings(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db)

    def flushall(self) -> None:
        self.client().flushall()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        # Same port, so every client reconnects to the "same" broker (which lost everything).
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise


class PostgresServer:
    """The local PostgreSQL server, where each test run creates (and drops) its own databases."""

    def __init__(self) -> None:
        # scripts/setup records a private cluster's URL when there is no usable local server.
        recorded = Path(__file__).resolve().parents[2] / ".refundq-test" / "postgres-url"
        self.admin_url = (
            os.environ.get("REFUNDQ_TEST_POSTGRES_URL")
            or (recorded.read_text().strip() if recorded.exists() else "")
            or "postgresql://postgres@127.0.0.1:5432/postgres"
        )
        self.created: list[str] = []

    def _connect(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5)

    def check(self) -> None:
        try:
            with self._connect() as connection:
                connection.execute("select 1")
        except Exception as exc:
            raise RuntimeError(
                f"PostgreSQL is not reachable at {self.admin_url} ({exc}); start it (Debian: "
                "pg_ctlcluster <version> main start) or set REFUNDQ_TEST_POSTGRES_URL; "
                ".ci/run does this for you"
            ) from exc

    def create_database(self, template: str | None = None) -> str:
        name = f"refundq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with self._connect() as connection:
            if template:
                connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                connection.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return name

    def url_for(self, name: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{name}"

    def drop_all(self) -> None:
        with self._connect() as connection:
            for name in self.created:
                connection.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                    (name,),
                )
                connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        self.created.clear()
