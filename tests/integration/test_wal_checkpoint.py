"""SQLite's write-ahead log is copied into the database by beat, not by a job's commit
(worker/db.py, WAL_AUTOCHECKPOINT_PAGES; issue 7): commits leave the log to grow past SQLite's
default 1,000 pages, beat's `refundq.checkpoint` copies it in the background, and the automatic
checkpoint stays as a safety net further out. Real SQLite, real worker and beat."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.base import Kind
from tests.support.polling import wait_for
from tests.support.stack import Stack, unique
from tests.support.turns import a_successful_turn
from worker import db, jobs
from worker.db import WAL_AUTOCHECKPOINT_PAGES, get_engine
from worker.schedule import beat_schedule
from worker.settings import Settings

SQLITE_DEFAULT_AUTOCHECKPOINT = 1000


@pytest.fixture
def sqlite_stack(request, tmp_path_factory) -> Iterator[Stack]:
    from tests.conftest import _stack_factory

    stacks: list[Stack] = []
    stack = _stack_factory("sqlite", request, tmp_path_factory, stacks)()
    yield stack
    stack.stop_all()
    stack.deactivate()


def jobs_done(count: int) -> None:
    """`count` refunds enqueued and taken through a successful turn, in this process."""
    for _ in range(count):
        ref = unique("ord")
        new = jobs.NewJob(
            kind=Kind.REFUND,
            provider="vai247",
            payment_ref=ref,
            currency="USD",
            amount_minor=500,
            original_amount_minor=5000,
            reason="test",
            extras={},
            idempotency_key=ref,
        )
        view, _ = jobs.insert_job(new, ref)
        a_successful_turn(view.id)


def wal_index(database: Path) -> tuple[int, int]:
    """(frames in the log, frames already copied into the database), read from the WAL index
    (the `-shm` file; https://www.sqlite.org/walformat.html: mxFrame at byte 16 of the header,
    nBackfill at byte 96, native byte order) without touching the database."""
    header = Path(f"{database}-shm").read_bytes()[:100]
    (log_frames,) = struct.unpack_from("=I", header, 16)
    (backfilled,) = struct.unpack_from("=I", header, 96)
    return log_frames, backfilled


def database_path() -> Path:
    return Path(get_engine().url.database or "")


def test_a_jobs_commit_no_longer_checkpoints_at_sqlites_default(sqlite_stack):
    with get_engine().connect() as connection:
        pages = connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
    assert pages == WAL_AUTOCHECKPOINT_PAGES > SQLITE_DEFAULT_AUTOCHECKPOINT
    db.checkpoint()  # start from an empty log

    jobs_done(150)  # about fifteen pages each

    log_frames, backfilled = wal_index(database_path())
    assert log_frames > 2 * SQLITE_DEFAULT_AUTOCHECKPOINT
    assert backfilled == 0  # no commit copied anything
    done = db.checkpoint()
    assert done is not None and not done.busy
    assert done.checkpointed_frames == done.log_frames == log_frames
    jobs_done(1)  # the next writer starts the log over
    assert wal_index(database_path())[0] < 100


def test_beat_checkpoints_the_log_in_the_background(sqlite_stack):
    sqlite_stack.start_worker(REFUNDQ_CHECKPOINT_INTERVAL_SECONDS="0.3")
    sqlite_stack.start_beat(REFUNDQ_CHECKPOINT_INTERVAL_SECONDS="0.3")
    db.checkpoint()
    jobs_done(20)  # well below any automatic checkpoint
    log_frames, _ = wal_index(database_path())
    assert log_frames > 0

    wait_for(
        lambda: wal_index(database_path())[1] >= log_frames,
        timeout=30,
        message=lambda: f"beat to checkpoint {log_frames} frames: {wal_index(database_path())}",
    )


def test_the_checkpoint_is_scheduled_for_sqlite_only():
    sqlite = beat_schedule(Settings(database_url="sqlite:///x.db", checkpoint_interval_seconds=2))
    postgres = beat_schedule(Settings(database_url="postgresql+psycopg://h/db"))

    assert sqlite["checkpoint-wal"]["task"] == "refundq.checkpoint"
    assert sqlite["checkpoint-wal"]["schedule"] == 2
    assert "checkpoint-wal" not in postgres


def test_on_postgresql_there_is_nothing_to_checkpoint(stack_factory, backend):
    stack: Stack = stack_factory()
    done = db.checkpoint()
    assert (done is None) == (stack.backend == "postgres")
