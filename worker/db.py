"""Engines and sessions, safe across fork, with SQLite tuned for several processes.

* Engines are created lazily per process and recreated after a fork: a SQLite or PostgreSQL
  connection must never cross `fork()` (sqlite.org/howtocorrupt.html 2.6; SQLAlchemy "pooling
  with multiprocessing"). Celery's prefork children call `reset_after_fork()` in
  `worker_process_init` as well, belt and braces.
* SQLite: WAL (readers never block the writer), `synchronous=NORMAL` (durable across a process
  crash; the last commits may be lost on power loss, acceptable for a single-host dev default),
  a 30 s busy timeout, and `BEGIN IMMEDIATE` for write transactions so a read that turns into a
  write never fails with SQLITE_BUSY halfway (CELERY_NOTES.md 7).
* Transactions are short and never held across an HTTP call (`worker.jobs` commits before it
  calls a gateway).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

from worker.settings import get_settings

_lock = threading.Lock()
_engines: dict[str, tuple[int, Engine]] = {}

SQLITE_BUSY_TIMEOUT_SECONDS = 30
BUSY_TIMEOUT_PRAGMA = "PRAGMA busy_timeout=30000"  # milliseconds: SQLITE_BUSY_TIMEOUT_SECONDS


def normalise_url(url: str) -> str:
    """PostgreSQL URLs without a driver use psycopg 3, the driver refundq ships with."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _create(url: str) -> Engine:
    url = normalise_url(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {
            "timeout": SQLITE_BUSY_TIMEOUT_SECONDS,
            "check_same_thread": False,
        }
    else:
        kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=10, pool_recycle=1800)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine)
    return engine


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves (pysqlite's own transaction handling would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(BUSY_TIMEOUT_PRAGMA)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get("refundq_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def get_engine(url: str | None = None) -> Engine:
    """This process's engine for `url` (default: the configured database)."""
    url = url or get_settings().database_url
    pid = os.getpid()
    with _lock:
        known = _engines.get(url)
        if known is not None and known[0] == pid:
            return known[1]
        if known is not None:
            # Inherited from the parent: drop the pool without touching the parent's sockets.
            known[1].dispose(close=False)
        engine = _create(url)
        _engines[url] = (pid, engine)
        return engine


def reset_after_fork() -> None:
    """Forget engines inherited from a parent process (Celery `worker_process_init`)."""
    with _lock:
        for _pid, engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()


def dispose_all() -> None:
    """Close every engine of this process (tests, CLI exit)."""
    with _lock:
        for _pid, engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def write_session() -> Iterator[Session]:
    """One short write transaction: committed on exit, rolled back on error."""
    engine = get_engine()
    bind = engine.execution_options(refundq_write=True) if is_sqlite(engine) else engine
    with Session(bind=bind, expire_on_commit=False) as session, session.begin():
        yield session


@contextmanager
def read_session() -> Iterator[Session]:
    """A read-only unit of work (no writes expected; rolled back on exit)."""
    with Session(bind=get_engine(), expire_on_commit=False) as session:
        yield session
