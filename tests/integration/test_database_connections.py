"""Pooled PostgreSQL connections that die while idle (a server restart, a proxy's idle timeout)
are replaced before use, without a ping on every checkout (worker/db.py, issue 7)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from tests.support.polling import wait_for
from tests.support.services import PostgresServer
from worker import db

pytestmark = pytest.mark.postgres


@pytest.fixture
def engine(postgres: PostgresServer) -> Iterator[Engine]:
    engine = db.get_engine(postgres.url_for(postgres.create_database()))
    yield engine
    engine.dispose()


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("select pg_backend_pid()")).scalar_one())


def _kill_backend(postgres: PostgresServer, pid: int) -> None:
    """Terminate the server process behind a pooled (now idle) connection, as a restart would."""
    with postgres._connect() as admin:
        admin.execute("select pg_terminate_backend(%s)", (pid,))
        wait_for(
            lambda: (
                admin.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone()
                is None
            ),
            timeout=10,
            message=f"backend {pid} to exit",
        )


def test_a_connection_killed_while_idle_is_pinged_and_replaced(
    engine: Engine, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = _backend_pid(engine)
    _kill_backend(postgres, dead)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)  # it has been idle "long enough"

    fresh = _backend_pid(engine)

    assert fresh != dead


def test_a_connection_used_moments_ago_is_not_pinged(
    engine: Engine, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cost saved, and the proof that the test above needs the ping: within the idle
    threshold the dead connection is handed out as is, and its first statement fails (the pool
    then discards it)."""
    dead = _backend_pid(engine)
    _kill_backend(postgres, dead)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 3600.0)

    with pytest.raises(OperationalError) as failed:
        _backend_pid(engine)

    assert failed.value.connection_invalidated
    assert _backend_pid(engine) != dead
