"""The state machine's hot-path statements, compiled once and run on the driver.

A job's three write transactions on SQLite run nine statements. Through SQLAlchemy's
`Connection.execute` each one pays for the compiled-cache lookup, an execution context,
parameter and result processing and the connection events, where sqlite3 itself spends
10-20 us: half of a job's database CPU under cProfile, and 0.3-0.6 ms of the 1.5-2.0 ms a
job's writes cost in one process (issue 7, BENCHMARKS.md, sixth round). On PostgreSQL the
same machinery was about half of the client's 4.3 ms per job (`bench writes`, seventh round).

Here a statement is still written once, in SQLAlchemy Core, next to its rule in
`worker/jobs.py`; it is compiled for the dialect once per shape (the statement and the
parameter names given), with its types' bind and result processors, and each execution is
one call on the sqlite3 or psycopg connection SQLAlchemy has checked out. The SQL is the
string SQLAlchemy itself would send. The transaction, SQLite's `BEGIN IMMEDIATE`, savepoints,
commit and rollback all stay SQLAlchemy's; on a PostgreSQL connection in autocommit
(`worker.db.single_statements`) each statement is its own transaction, as it is there.

Used only where the statement is a fixed object (module constants and the state machine's
per-shape caches); everything else goes through `Connection.execute` unchanged. A statement
that needs what only an execution context provides (Python-side column defaults, an IN list
expanded per execution, an INSERT whose new key PostgreSQL returns) is refused at compile
time and runs through SQLAlchemy too, as does every statement on an engine with `echo` on.
Driver errors go through SQLAlchemy's own handler: they are raised as its exceptions
(`IntegrityError`, `OperationalError`), and a connection the server dropped is invalidated.
What this skips, knowingly: SQLAlchemy's `before_cursor_execute` and `after_cursor_execute`
events, so an instrumentation that listens there does not see these statements (the tests
trace the drivers themselves, tests/support/statements.py)."""

from __future__ import annotations

import re
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
    # Held so that the ids in the plan's key cannot be reused while the plan lives.
    statement: ClauseElement
    dialect: Dialect  # a process may use several databases (the tests use SQLite and PostgreSQL)
    sql: str
    positional: bool  # sqlite3's `?` placeholders; else psycopg's `%(name)s`
    names: tuple[str, ...]  # the bind names (for `?`, in the placeholders' order)
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


# A bind in the SQL SQLAlchemy compiles for psycopg (a literal `%` is written `%%`).
_NAMED_PLACEHOLDER = re.compile(r"(?<!%)%\(([^)]+)\)s")

# The dialects whose driver this module calls directly.
_DIRECT = frozenset({"sqlite", "postgresql"})

# (id of the statement, id of the dialect, parameter names) -> its plan, or None for a
# statement refused. A plan holds its statement and dialect, so those ids are not reused while
# the entry lives; a refusal does not, and a new statement or dialect that happened to get a
# refused one's id would only run through SQLAlchemy.
_plans: dict[tuple[int, int, tuple[str, ...]], _Plan | None] = {}
_plans_lock = threading.Lock()


def execute(connection: Any, statement: Executable, params: Mapping[str, Any]) -> Any:
    """`connection.execute(statement, params)`, on the driver directly when it can be.

    `statement` must be a fixed object (it is compiled once per parameter names and kept)."""
    if (
        not isinstance(connection, Connection)
        or connection.dialect.name not in _DIRECT
        or connection.closed
        or connection._echo  # an engine with `echo` logs every statement: SQLAlchemy's job
    ):
        return connection.execute(statement, params)
    if not connection.in_transaction() and not _autocommits(connection):
        # Let SQLAlchemy begin: on SQLite its `begin` event sends `BEGIN IMMEDIATE`.
        return connection.execute(statement, params)
    plan = _plan_for(connection.dialect, statement, tuple(sorted(params)))
    if plan is None:
        return connection.execute(statement, params)
    return _run(connection, plan, params)


def _autocommits(connection: Connection) -> bool:
    """A PostgreSQL connection in autocommit (`worker.db.single_statements`): each statement is
    its own transaction and SQLAlchemy has nothing to begin."""
    driver = connection.connection.driver_connection
    return connection.dialect.name == "postgresql" and bool(getattr(driver, "autocommit", False))


def _run(connection: Connection, plan: _Plan, params: Mapping[str, Any]) -> Result:
    values = []
    for name, process in zip(plan.names, plan.processors, strict=True):
        value = params[name] if name in params else plan.constants[name]
        # Processors see None too: SQLAlchemy's JSON stores None as JSON 'null', for one.
        values.append(value if process is None else process(value))
    # sqlite3 takes the values in the order of its `?` placeholders, psycopg by name.
    arguments: Sequence[Any] | dict[str, Any] = (
        values if plan.positional else dict(zip(plan.names, values, strict=True))
    )
    driver = connection.connection.driver_connection
    assert driver is not None, "a checked-out connection has its driver connection"
    cursor = driver.cursor()
    try:
        cursor.execute(plan.sql, arguments)
        rows = cursor.fetchall() if plan.row is not None else []
        rowcount, lastrowid = cursor.rowcount, getattr(cursor, "lastrowid", None)
    except BaseException as error:  # noqa: BLE001 - SQLAlchemy's handler always raises
        # SQLAlchemy's own handling, as for its own statements: its exception classes
        # (`IntegrityError`, ...), and a connection the server dropped, or a statement cut
        # short by an exit exception, invalidated rather than returned to the pool.
        connection._handle_dbapi_exception(error, plan.sql, arguments, cursor, None)
    finally:
        cursor.close()
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
    key = (id(statement), id(dialect), keys)
    if key in _plans:
        plan = _plans[key]
        if plan is None or (plan.statement is statement and plan.dialect is dialect):
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
    if compiled.insert_prefetch or compiled.update_prefetch or compiled.post_compile_params:
        # Needs SQLAlchemy's execution context: Python-side defaults, or an IN list expanded
        # per execution.
        return None
    if dialect.name != "sqlite" and (
        compiled.effective_returning and not getattr(statement, "_returning", ())
    ):
        # An INSERT whose new key SQLAlchemy reads from a RETURNING it added itself: only
        # SQLite's `lastrowid` is read here.
        return None
    positional = compiled.positiontup is not None
    if positional:
        names = tuple(compiled.positiontup or ())
    else:  # psycopg's `%(name)s`: each name once, values passed by name
        names = tuple(dict.fromkeys(_NAMED_PLACEHOLDER.findall(compiled.string)))
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
        dialect=dialect,
        sql=compiled.string,
        positional=positional,
        names=names,
        processors=processors,
        constants=constants,
        row=row_type,
        result_processors=result_processors,
    )


def _row_type(names: list[str]) -> type:
    """Rows read by position and by column name, as SQLAlchemy's `Row`."""
    return namedtuple("Row", names, rename=True)
