"""What this process sends to the database: the SQL of each statement (whitespace folded,
lower case), whether its connection was in autocommit, and its values (psycopg's; sqlite3's
trace has them in the SQL already)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import event

from worker.db import get_engine

# Transaction control: SQLAlchemy's cursor events never show these on SQLite (worker/db.py
# emits BEGIN on the driver), so the driver's trace leaves them out too.
_CONTROL = ("begin", "commit", "rollback", "pragma")


@dataclass(frozen=True)
class Sent:
    sql: str
    autocommit: bool
    params: Any = field(default=None, compare=False)
    raw: str = field(default="", compare=False)  # as sent, to send again (EXPLAIN)


@contextmanager
def statements_sent() -> Iterator[list[Sent]]:
    """Every statement the configured database receives from this process while the block
    runs, in order. The hot path runs on the driver directly (worker/driver.py), so what
    counts is the driver's own view: sqlite3's trace, or the cursors of psycopg connections.
    Neither sees transaction control (`BEGIN`, `COMMIT`), as SQLAlchemy's events did not."""
    seen: list[Sent] = []
    engine = get_engine()
    trace = _sqlite_trace if engine.dialect.name == "sqlite" else _psycopg_trace
    with trace(engine, seen):
        yield seen


@contextmanager
def _psycopg_trace(engine: Any, seen: list[Sent]) -> Iterator[None]:
    class TracedCursor(psycopg.Cursor):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            sql = query if isinstance(query, str) else query.as_string(self.connection)
            params = args[0] if args else kwargs.get("params")
            folded = " ".join(sql.split()).lower()
            seen.append(Sent(folded, bool(self.connection.autocommit), params, sql))
            return super().execute(query, *args, **kwargs)

    return_to: dict[int, Any] = {}

    def on_checkout(dbapi_connection: Any, *_args: Any) -> None:
        return_to[id(dbapi_connection)] = dbapi_connection.cursor_factory
        dbapi_connection.cursor_factory = TracedCursor

    def on_checkin(dbapi_connection: Any, *_args: Any) -> None:
        if id(dbapi_connection) in return_to:
            dbapi_connection.cursor_factory = return_to.pop(id(dbapi_connection))

    event.listen(engine.pool, "checkout", on_checkout)
    event.listen(engine.pool, "checkin", on_checkin)
    try:
        yield
    finally:
        event.remove(engine.pool, "checkout", on_checkout)
        event.remove(engine.pool, "checkin", on_checkin)


@contextmanager
def _sqlite_trace(engine: Any, seen: list[Sent]) -> Iterator[None]:
    def trace(statement: str) -> None:
        sql = " ".join(statement.split()).lower()
        if not sql.startswith(_CONTROL):
            seen.append(Sent(sql, False, None, statement))

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
