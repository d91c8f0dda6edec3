"""Shared fixtures: real services, private to this run.

* `redis_server` — a `redis-server` of our own on a free port (session).
* `postgres` — the local PostgreSQL server, where the run creates and drops its own databases.
* `sandbox_server` / `sandbox` — the gateway simulators over real HTTP on loopback.
* `running` — a module's shared stack (database, worker, beat), once per database backend.
* `stack_factory` — stacks of one's own, for tests that kill, flush or restart things.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.sandbox import SandboxAdmin, SandboxServer
from tests.support.services import PostgresServer, RedisServer
from tests.support.stack import (
    Stack,
    copy_sqlite,
    migrated_postgres_template,
    migrated_sqlite_template,
)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.check()
    yield server
    from worker.db import dispose_all

    dispose_all()
    server.drop_all()


@pytest.fixture(scope="session")
def postgres_template(postgres: PostgresServer) -> str:
    return migrated_postgres_template(postgres)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_sqlite_template(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture(scope="session")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    server = SandboxServer(tmp_path_factory.mktemp("sandbox-keys"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> Iterator[SandboxAdmin]:
    admin = SandboxAdmin(sandbox_server.base_url)
    yield admin
    admin.clear_faults()


def fresh_database(
    backend: str,
    directory: Path,
    request: pytest.FixtureRequest,
) -> str:
    if backend == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        return copy_sqlite(template, directory / "refundq.db")
    postgres: PostgresServer = request.getfixturevalue("postgres")
    template_name = request.getfixturevalue("postgres_template")
    return postgres.url_for(postgres.create_database(template=template_name))


StackFactory = Callable[..., Stack]


def _stack_factory(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    stacks: list[Stack],
) -> StackFactory:
    def make(redis: RedisServer | None = None, sandbox: Any = None, **extra_env: str) -> Stack:
        workdir = tmp_path_factory.mktemp(f"stack-{backend}")
        server = sandbox or request.getfixturevalue("sandbox_server")
        stack = Stack(
            backend=backend,
            database_url=fresh_database(backend, workdir, request),
            redis=redis or request.getfixturevalue("redis_server"),
            sandbox_env=server.env(),
            sandbox=SandboxAdmin(server.base_url),
            workdir=workdir,
            extra_env=dict(extra_env),
        )
        stack.activate()
        stacks.append(stack)
        return stack

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stack_factory(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    stacks: list[Stack] = []
    yield _stack_factory(backend, request, tmp_path_factory, stacks)
    for stack in reversed(stacks):
        stack.stop_all()
        stack.deactivate()
    stacks[0].sandbox.clear_faults() if stacks else None


@pytest.fixture(scope="module", params=BACKENDS)
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack per test module and backend: a worker (prefork, 2 processes) and beat."""
    stacks: list[Stack] = []
    stack = _stack_factory(str(request.param), request, tmp_path_factory, stacks)()
    try:
        stack.start(workers=1, beat=True)
        yield stack
    finally:
        stack.stop_all()
        stack.deactivate()


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_run() -> Iterator[None]:
    """Whatever a test started (workers, beats, APIs) dies with the run, even if a fixture
    failed half-way."""
    yield
    from tests.support.stack import kill_everything_spawned

    kill_everything_spawned()
