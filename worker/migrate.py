"""Schema migrations (Alembic), run by `refundq db upgrade` and by the test fixtures."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from worker.db import normalise_url
from worker.settings import get_settings

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would eat a '%' in a password.
    database_url = normalise_url(url or get_settings().database_url).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at `url` (default: the configured one) to `revision`."""
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    from worker.db import get_engine

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
