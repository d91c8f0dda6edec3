"""`worker.db.recheck`: the compare-and-set check written so that no index serves it (issue 7)
means `=` for its values and refuses None, where `IS NOT DISTINCT FROM` would match NULL."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, create_engine, select
from sqlalchemy.dialects import postgresql

from worker.db import recheck

ROWS = Table(
    "rows",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("state", String, nullable=True),
)


def matching(*values: object) -> list[int]:
    engine = create_engine("sqlite://")
    ROWS.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            ROWS.insert(),
            [{"id": 1, "state": "queued"}, {"id": 2, "state": "done"}, {"id": 3, "state": None}],
        )
        query = select(ROWS.c.id).where(recheck(ROWS.c.state, *values)).order_by(ROWS.c.id)
        return list(connection.execute(query, {"s": "done"}).scalars())


def test_it_matches_what_equality_matches_and_never_a_null():
    assert matching("queued") == [1]
    assert matching("queued", "done") == [1, 2]
    assert matching(bindparam("s")) == [2]
    assert matching("retry_wait") == []


def test_postgresql_gets_an_operator_no_index_serves():
    sql = str(
        select(ROWS.c.id)
        .where(recheck(ROWS.c.state, "queued"))
        .compile(dialect=postgresql.dialect())
    )
    assert "IS NOT DISTINCT FROM" in sql and " = " not in sql


@pytest.mark.parametrize("values", [(None,), ("queued", None), ()])
def test_none_or_nothing_is_refused(values):
    with pytest.raises(ValueError, match="not None"):
        recheck(ROWS.c.state, *values)
