"""`refundq db upgrade` builds the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import worker.models  # noqa: F401
from tests.support.services import PostgresServer
from tests.support.stack import REPO
from worker.db import dispose_all, get_engine


def upgrade_with_cli(url: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "REFUNDQ_DATABASE_URL": url, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "db", "upgrade"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def empty_database(backend: str, tmp_path, request) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return postgres.url_for(postgres.create_database())


def test_db_upgrade_builds_exactly_the_models_schema_and_is_idempotent(backend, tmp_path, request):
    url = empty_database(backend, tmp_path, request)

    first = upgrade_with_cli(url)
    again = upgrade_with_cli(url)

    assert first.returncode == 0, first.stderr
    assert "database at revision" in first.stderr
    assert again.returncode == 0, again.stderr
    try:
        with get_engine(url).connect() as connection:
            drift = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    finally:
        dispose_all()
    assert drift == [], f"models and migrations disagree: {drift}"
