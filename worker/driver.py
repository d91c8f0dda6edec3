"""The state machine's hot-path statements on SQLite, compiled once and run on the driver.

A job's three write transactions on SQLite run nine statements. Through SQLAlchemy's
`Connection.execute` each one pays for the compiled-cache lookup, an execution context,
parameter and result processing and the connection events, where sqlite3 itself spends
10-20 us: half of a job's database CPU under cProfile, and 0.3-0.6 ms of the 1.5-2.0 ms a
job's writes cost in one process (issue 7, BENCHMARKS.md, sixth round).

Here a statement is still written once, in SQLAlchemy Core, next to its rule in
`worker/jobs.py`; it is compiled for the dialect once per shape (the statement and the
parameter names given), with its types' bind and result processors, and each execution is
one call on the sqlite3 connection the SQLAlchemy transaction already holds. The transaction,
the `BEGIN IMMEDIATE`, savepoints, commit and rollback all stay SQLAlchemy's.

Used only where the statement is a fixed object (module constants and the state machine's
per-shape caches) and only on SQLite; everything else, and every statement on PostgreSQL,
goes through `Connection.execute` unchanged. A statement that needs what only an execution
context provides (Python-side column defaults, an IN list expanded per execution) is refused
at compile time and runs through SQLAlchemy too. Driver errors are raised as SQLAlchemy's own
exceptions (`IntegrityError`, `OperationalError`), as callers expect."""

from __future__ import annotations

import sqlite3
import threading
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.expression import Executable

Processor = Callable[[Any], Any] | None

# Shapes compiled so far. Bounded by the statements that use this module (a few dozen); the
# bound only guards against a caller passing statements built afresh on every call.
_MAX_PLANS = 512


@dataclass(frozen=True)
class _Plan:
    statement: ClauseElement  # held so that `id(statement)` in the key cannot be reused
    sql: str
    names: tuple[str, ...]  # the bind names, in the order of the `?` placeholders
    processors: tuple[Processor, ...]
    constants: Mapping[str, Any]  # binds whose value the statement itself carries
    row: type | None  # a namedtuple of the result columns, for statements that return rows
    result_processors: tuple[Processor, ...]


class Result:
    """The slice of SQLAlchemy's `CursorResult` the hot path reads."""

    __slots__ = ("_rows", "lastrowid", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int, lastrowid: int | None) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def first(self) -> Any | None:
        return self._rows[0] if self._rows else None

    def all(self) -> list[Any]:
        return self._rows

    def scalar_one_or_none(self) -> Any | None:
        if len(self._rows) > 1:
            raise exc.MultipleResultsFound("Multiple rows were found when one or none was required")
        return self._rows[0][0] if self._rows else None

    @property
    def inserted_primary_key(self) -> tuple[int | None]:
        return (self.lastrowid,)


# (id of the statement, parameter names) -> its plan, or None for a statement refused. A plan
# holds its statement, so that id is not reused while the entry lives; a refusal does not, and
# a new statement that happened to get a refused one's id would only run through SQLAlchemy.
_plans: dict[tuple[int, tuple[str, ...]], _Plan | None] = {}
_plans_lock = threading.Lock()


def execute(connection: Any, statement: Executable, params: Mapping[str, Any]) -> Any:
    """`connection.execute(statement, params)`, on SQLite's driver directly when it can be.

    `statement` must be a fixed object (it is compiled once per parameter names and kept)."""
    if not isinstance(connection, Connection) or connection.dialect.name != "sqlite":
        return connection.execute(statement, params)
    if not connection.in_transaction() or connection.closed:
        return connection.execute(statement, params)  # let SQLAlchemy begin or complain
    plan = _plan_for(connection.dialect, statement, tuple(sorted(params)))
    if plan is None:
        return connection.execute(statement, params)
    return _run(connection, plan, params)


def _run(connection: Connection, plan: _Plan, params: Mapping[str, Any]) -> Result:
    values = []
    for name, process in zip(plan.names, plan.processors, strict=True):
        value = params[name] if name in params else plan.constants[name]
        # Processors see None too: SQLAlchemy's JSON stores None as JSON 'null', for one.
        values.append(value if process is None else process(value))
    driver = connection.connection.driver_connection
    assert driver is not None, "a connection in a transaction has its driver connection"
    try:
        cursor = driver.execute(plan.sql, values)
        try:
            rows = cursor.fetchall() if plan.row is not None else []
            rowcount, lastrowid = cursor.rowcount, cursor.lastrowid
        finally:
            cursor.close()
    except sqlite3.Error as error:
        raise exc.DBAPIError.instance(
            plan.sql, values, error, sqlite3.Error, dialect=connection.dialect
        ) from error
    if plan.row is not None:
        make, processors = plan.row._make, plan.result_processors  # type: ignore[attr-defined]
        rows = [
            make(
                value if process is None else process(value)
                for value, process in zip(raw, processors, strict=True)
            )
            for raw in rows
        ]
    return Result(rows, rowcount, lastrowid)


def plan_count() -> int:
    """How many statement shapes this process has compiled for the driver (warm-up, tests)."""
    return sum(plan is not None for plan in _plans.values())


def _plan_for(dialect: Dialect, statement: Executable, keys: tuple[str, ...]) -> _Plan | None:
    key = (id(statement), keys)
    if key in _plans:
        plan = _plans[key]
        if plan is None or plan.statement is statement:
            return plan
    built = _compile(dialect, statement, keys)
    with _plans_lock:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = built
    return built


def _compile(dialect: Dialect, statement: Executable, keys: Sequence[str]) -> _Plan | None:
    assert isinstance(statement, ClauseElement)
    compiled = statement.compile(
        dialect=dialect,
        column_keys=list(keys) if isinstance(statement, UpdateBase) else None,
    )
    assert isinstance(compiled, SQLCompiler)
    if (
        compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.post_compile_params
        or compiled.positiontup is None
    ):
        # Needs SQLAlchemy's execution context: Python-side defaults, or an IN list expanded
        # per execution.
        return None
    names = tuple(compiled.positiontup)
    binds = compiled.binds
    constants: dict[str, Any] = {}
    for name in names:
        bind = binds.get(name)
        if bind is None:
            return None
        if name not in keys:
            if bind.required or bind.callable is not None:
                return None
            constants[name] = bind.value
    processors = tuple(binds[name].type._cached_bind_processor(dialect) for name in names)
    row_type: type | None = None
    result_processors: tuple[Processor, ...] = ()
    columns = compiled._result_columns
    if columns:
        row_type = _row_type([column[0] for column in columns])
        result_processors = tuple(
            column[3]._cached_result_processor(dialect, None) for column in columns
        )
    return _Plan(
        statement=statement,
        sql=compiled.string,
        names=names,
        processors=processors,
        constants=constants,
        row=row_type,
        result_processors=result_processors,
    )


def _row_type(names: list[str]) -> type:
    """Rows read by position and by column name, as SQLAlchemy's `Row`."""
    return namedtuple("Row", names, rename=True)
