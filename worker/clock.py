"""Time, in one form: aware UTC datetimes. SQLModel's `UTCDateTime` stores them as UTC on both
databases (timestamptz on PostgreSQL, offset-less UTC text on SQLite) and refuses naive ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utcnow() -> datetime:
    """Now, aware UTC."""
    return datetime.now(UTC)


def after(seconds: float) -> datetime:
    """`seconds` from now."""
    return utcnow() + timedelta(seconds=seconds)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 with a Z, for views and logs."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
