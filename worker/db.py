"""Engines and sessions, safe across fork, with SQLite tuned for several processes.

* Engines are created lazily per process; after a fork the child keeps the engine object (and
  its compiled statements, which `worker.warmup` fills in the parent) but gets a new, empty
  pool: a SQLite or PostgreSQL connection must never cross `fork()` (sqlite.org/howtocorrupt.html
  2.6; SQLAlchemy "pooling with multiprocessing": `dispose(close=False)` in the child). Celery's
  prefork children call `reset_after_fork()` in `worker_process_init` as well, belt and braces.
* SQLite: WAL (readers never block the writer), `synchronous=NORMAL` (durable across a process
  crash; the last commits may be lost on power loss, acceptable for a single-host dev default),
  a 30 s busy timeout, and `BEGIN IMMEDIATE` for write transactions so a read that turns into a
  write never fails with SQLITE_BUSY halfway (CELERY_NOTES.md 7). Waiting for the write lock is
  ours, not SQLite's (`_begin_immediate`): SQLite's busy handler sleeps 1, 2, 5, 10, 15, 20,
  25 ms... between tries, so with a few processes writing, a lock held for half a millisecond
  kept the others asleep for tens (issue 7, BENCHMARKS.md).
* Transactions are short and never held across an HTTP call (`worker.jobs` commits before it
  calls a gateway).
* PostgreSQL: a pooled connection is pinged before use only if it sat idle for a while
  (`_ping_if_idle`), not on every checkout as `pool_pre_ping` would: a job's writes follow each
  other within milliseconds, and a ping each was one round trip in five (issue 7: +6%
  throughput without it). A write that is one statement runs in autocommit
  (`single_statements`): no BEGIN and COMMIT round trips. A connection idle past
  `PING_AFTER_IDLE_SECONDS` (a gateway call can take that long, a server restart takes longer)
  is pinged and replaced if dead, so the write that records a gateway's answer does not meet a
  connection killed during the call.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, event, or_
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlmodel import Session, create_engine

from worker.settings import get_settings

_lock = threading.Lock()


@dataclass(frozen=True)
class _ProcessEngines:
    """One process's engine for a URL, and the same engine (and pool) set up two other ways."""

    pid: int
    engine: Engine
    writer: Engine  # write transactions (SQLite: `BEGIN IMMEDIATE`)
    autocommit: Engine  # single statements, each its own transaction


_engines: dict[str, _ProcessEngines] = {}

SQLITE_BUSY_TIMEOUT_SECONDS = 30
# Between tries for SQLite's write lock: from 0.1 ms, growing to at most 2 ms, with jitter.
_LOCK_POLL_FIRST_SECONDS = 0.0001
_LOCK_POLL_MAX_SECONDS = 0.002
BUSY_TIMEOUT_PRAGMA = "PRAGMA busy_timeout=30000"  # milliseconds: SQLITE_BUSY_TIMEOUT_SECONDS
NO_BUSY_TIMEOUT_PRAGMA = "PRAGMA busy_timeout=0"

# SQLite copies its write-ahead log into the database from whichever commit takes the log past
# `wal_autocheckpoint` pages (default 1,000), and that commit waits for the copy and its fsync:
# at 50 jobs/s, one job in about sixty-five was 10-15 ms late, which made a single refund's p99
# (issue 7, BENCHMARKS.md, sixth round). Beat runs the checkpoint instead (`checkpoint`, every
# `checkpoint_interval_seconds`), in a task of its own; the automatic one stays, ten times
# further out, for when no beat runs or its task waits behind a burst of jobs.
WAL_AUTOCHECKPOINT_PAGES = 10_000
WAL_AUTOCHECKPOINT_PRAGMA = "PRAGMA wal_autocheckpoint=10000"  # WAL_AUTOCHECKPOINT_PAGES


def normalise_url(url: str) -> str:
    """PostgreSQL URLs without a driver use psycopg 3, the driver refundq ships with."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def recheck(column: Any, *values: Any) -> ColumnElement[bool]:
    """`column` is one of `values`: a compare-and-set's check on a row its statement already
    names by primary key (a job's status, a notification's state).

    Written `IS NOT DISTINCT FROM` (for values that are not NULL it means `=`) because
    PostgreSQL never serves that operator from an index. With `=`, its planner could find the
    row through a status index instead of the primary key whenever its statistics call the
    status rare, as `submitting` always is, and then walk every in-flight job, and every dead
    index entry a moved job left, to find it. Measured on the outcome's statement: 233 buffers
    read to find the job instead of 4 (issue 7, BENCHMARKS.md, eighth round). SQLite's planner
    took the unique key either way (tests/integration/test_query_plans.py).

    `IS NOT DISTINCT FROM NULL` would match a NULL where `=` matches nothing, so a None value
    is refused: a compare-and-set must not start matching rows by accident."""
    if not values or any(value is None for value in values):
        raise ValueError(f"recheck({column}) needs values that are not None, got {values!r}")
    return or_(*(column.is_not_distinct_from(value) for value in values))


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
        kwargs.update(pool_size=5, max_overflow=10, pool_recycle=1800)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine)
    else:
        _ping_if_idle(engine)
    return engine


# A pooled connection idle longer than this is pinged before use (see the module docstring).
PING_AFTER_IDLE_SECONDS = 0.5


def _ping_if_idle(engine: Engine) -> None:
    """SQLAlchemy's pessimistic disconnect handling (a checkout listener that raises
    `DisconnectionError`, after which the pool retries with a fresh connection), applied only to
    connections that have been idle: busy ones were proven alive milliseconds ago."""

    @event.listens_for(engine.pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return  # new (just connected), or in use moments ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            if engine.dialect.is_disconnect(exc, dbapi_connection, None):
                raise DisconnectionError(f"pooled connection found dead: {exc}") from exc
            raise


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
        cursor.execute(WAL_AUTOCHECKPOINT_PRAGMA)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        driver = connection.connection.driver_connection
        if connection.get_execution_options().get("refundq_write", False):
            _begin_immediate(driver)
        else:
            driver.execute("BEGIN")


def _begin_immediate(driver: sqlite3.Connection) -> None:
    """`BEGIN IMMEDIATE`, waiting for the write lock in short polls instead of SQLite's busy
    handler (whose sleeps grow to 25-100 ms). Same deadline as the busy timeout, which every
    other statement keeps (in WAL mode nothing else waits for the write lock; a read may still
    meet a brief SQLITE_BUSY while another connection recovers the WAL after a crash)."""
    driver.execute(NO_BUSY_TIMEOUT_PRAGMA)
    try:
        deadline = None
        delay = _LOCK_POLL_FIRST_SECONDS
        while True:
            try:
                driver.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                now = time.monotonic()
                deadline = deadline or now + SQLITE_BUSY_TIMEOUT_SECONDS
                if now > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.5, _LOCK_POLL_MAX_SECONDS)
    finally:
        driver.execute(BUSY_TIMEOUT_PRAGMA)


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY (another connection holds the write lock), by its primary result code."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


def _engines_for(url: str | None) -> _ProcessEngines:
    """This process's engines for `url`."""
    url = url or get_settings().database_url
    pid = os.getpid()
    with _lock:
        known = _engines.get(url)
        if known is not None and known.pid == pid:
            return known
        if known is not None:
            # Inherited from the parent: a new pool, without touching the parent's connections;
            # the engine, its listeners and its compiled statements stay.
            known.engine.dispose(close=False)
            _engines[url] = dataclasses.replace(known, pid=pid)
            return _engines[url]
        engine = _create(url)
        # Built once: `execution_options` makes a new engine object on every call.
        engines = _ProcessEngines(
            pid=pid,
            engine=engine,
            writer=engine.execution_options(refundq_write=True) if is_sqlite(engine) else engine,
            autocommit=engine.execution_options(isolation_level="AUTOCOMMIT"),
        )
        _engines[url] = engines
        return engines


@dataclass(frozen=True)
class Checkpoint:
    """What one checkpoint did: the log's frames, and how many of them are in the database."""

    busy: bool  # a reader or writer kept it from finishing; the next one carries on
    log_frames: int
    checkpointed_frames: int


def checkpoint() -> Checkpoint | None:
    """Copy SQLite's write-ahead log into the database, off the jobs' path (see
    `WAL_AUTOCHECKPOINT_PAGES`); None on PostgreSQL, which has nothing to do. PASSIVE: it
    neither waits for nor blocks readers and writers, and copies what it can."""
    engine = get_engine()
    if not is_sqlite(engine):
        return None
    # The driver's connection directly: a SQLAlchemy connection would open a transaction first,
    # and a checkpoint inside one copies nothing its own snapshot still needs.
    pooled = engine.raw_connection()
    try:
        driver = pooled.driver_connection
        assert driver is not None
        busy, log_frames, done = driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        pooled.close()
    return Checkpoint(busy=bool(busy), log_frames=log_frames, checkpointed_frames=done)


def get_engine(url: str | None = None) -> Engine:
    """This process's engine for `url` (default: the configured database)."""
    return _engines_for(url).engine


def reset_after_fork() -> None:
    """Give engines inherited from a parent process new pools (Celery `worker_process_init`)."""
    pid = os.getpid()
    with _lock:
        for url, engines in list(_engines.items()):
            if engines.pid != pid:
                engines.engine.dispose(close=False)
                _engines[url] = dataclasses.replace(engines, pid=pid)


def dispose_all() -> None:
    """Close every engine of this process (tests, CLI exit)."""
    with _lock:
        for engines in _engines.values():
            engines.engine.dispose()
        _engines.clear()


# The connection of a rehearsal under way in this thread (see `rehearsal`), if any.
_rehearsing: ContextVar[Connection | None] = ContextVar("refundq_rehearsing", default=None)


@contextmanager
def rehearsal() -> Iterator[None]:
    """Run the block's database work for real, then roll all of it back.

    Every session and transaction the block opens through this module is part of the one
    transaction of the rehearsal, and every statement is compiled and cached by the engine as
    for real: `worker.warmup` rehearses a job's turn in a worker's parent so that its pool
    processes inherit the statements compiled. Afterwards the parent's connections are closed
    (the engine and its compiled statements stay), so none is open when the pool forks."""
    engines = _engines_for(None)
    try:
        with engines.writer.connect() as connection:
            transaction = connection.begin()
            token = _rehearsing.set(connection)
            try:
                yield
            finally:
                _rehearsing.reset(token)
                transaction.rollback()
    finally:
        engines.engine.dispose()


def _session(bind: Engine) -> Session:
    rehearsing = _rehearsing.get()
    if rehearsing is not None:
        # Joins the rehearsal's transaction (a savepoint): its "commit" commits nothing.
        return Session(
            bind=rehearsing, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
    return Session(bind=bind, expire_on_commit=False)


@contextmanager
def write_session() -> Iterator[Session]:
    """One short write transaction: committed on exit, rolled back on error."""
    with _session(_engines_for(None).writer) as session, session.begin():
        yield session


@contextmanager
def write_transaction() -> Iterator[Connection]:
    """One short write transaction on a Core connection (no ORM unit of work): committed on
    exit, rolled back on error. The job state machine's hot path uses it."""
    rehearsing = _rehearsing.get()
    if rehearsing is not None:
        with rehearsing.begin_nested():
            yield rehearsing
        return
    with _engines_for(None).writer.begin() as connection:
        yield connection


def one_statement_writes() -> bool:
    """Whether the configured database takes a write of several rows as one statement
    (PostgreSQL's data-modifying `WITH`); SQLite does not."""
    return _engines_for(None).engine.dialect.name == "postgresql"


@contextmanager
def single_statements() -> Iterator[Connection]:
    """A connection on which every statement is its own transaction (autocommit), for writes
    made of one statement each. On PostgreSQL a transaction's `BEGIN` and `COMMIT` are a round
    trip each: a write that is one statement costs one round trip here instead of three
    (issue 7). A single statement is atomic, whatever it writes."""
    rehearsing = _rehearsing.get()
    if rehearsing is not None:
        yield rehearsing
        return
    with _engines_for(None).autocommit.connect() as connection:
        yield connection


@contextmanager
def read_session() -> Iterator[Session]:
    """A read-only unit of work (no writes expected; rolled back on exit)."""
    with _session(get_engine()) as session:
        yield session
