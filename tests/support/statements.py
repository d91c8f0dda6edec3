"""What this process sends to the database: the SQL of each statement (whitespace folded,
lower case) and whether its connection was in autocommit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event

from worker.db import get_engine


@dataclass(frozen=True)
class Sent:
    sql: str
    autocommit: bool


@contextmanager
def statements_sent() -> Iterator[list[Sent]]:
    """Every statement the configured database receives from this process while the block
    runs, in order."""
    seen: list[Sent] = []

    def record(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        driver = conn.connection.driver_connection
        autocommit = bool(getattr(driver, "autocommit", False))
        seen.append(Sent(" ".join(statement.split()).lower(), autocommit))

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
