"""What this process sends to the database: the SQL of each statement (whitespace folded,
lower case) and whether its connection was in autocommit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event

from worker.db import get_engine

# Transaction control: SQLAlchemy's cursor events never show these on SQLite (worker/db.py
# emits BEGIN on the driver), so the driver's trace leaves them out too.
_CONTROL = ("begin", "commit", "rollback", "pragma")


@dataclass(frozen=True)
class Sent:
    sql: str
    autocommit: bool


@contextmanager
def statements_sent() -> Iterator[list[Sent]]:
    """Every statement the configured database receives from this process while the block
    runs, in order. On SQLite the hot path runs on sqlite3 directly (worker/driver.py), so
    there the driver's own trace is what counts; elsewhere SQLAlchemy's cursor events."""
    seen: list[Sent] = []
    engine = get_engine()
    if engine.dialect.name == "sqlite":
        with _sqlite_trace(engine, seen):
            yield seen
        return

    def record(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        driver = conn.connection.driver_connection
        autocommit = bool(getattr(driver, "autocommit", False))
        seen.append(Sent(" ".join(statement.split()).lower(), autocommit))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@contextmanager
def _sqlite_trace(engine: Any, seen: list[Sent]) -> Iterator[None]:
    def trace(statement: str) -> None:
        sql = " ".join(statement.split()).lower()
        if not sql.startswith(_CONTROL):
            seen.append(Sent(sql, False))

    def on_checkout(dbapi_connection: Any, *_args: Any) -> None:
        dbapi_connection.set_trace_callback(trace)

    def on_checkin(dbapi_connection: Any, *_args: Any) -> None:
        dbapi_connection.set_trace_callback(None)

    event.listen(engine.pool, "checkout", on_checkout)
    event.listen(engine.pool, "checkin", on_checkin)
    try:
        yield
    finally:
        event.remove(engine.pool, "checkout", on_checkout)
        event.remove(engine.pool, "checkin", on_checkin)
