"""beat, as the Procfile runs it, stops on SIGTERM or SIGINT even when the signal lands while a
tick is publishing (worker/beat.py). Redis's replies reach beat through a proxy which, once
beat is publishing, holds each one back for a second, so beat is nearly always waiting for
one; the signal is sent while a reply is held. With Celery's own handler, beat logged that
publish as failed ("I/O operation on closed file") and ticked on until honcho SIGKILLed it; it
must instead finish the publish and exit 0 on its own."""

from __future__ import annotations

import os
import signal

import pytest

from tests.ops.support import start_procfile_process
from tests.support.polling import wait_for
from tests.support.slow_replies import SlowReplies

# Every entry due every 0.1 s: beat always has something to publish.
_EVERY_TENTH = {
    f"REFUNDQ_{name}_INTERVAL_SECONDS": "0.1"
    for name in ("DISPATCH", "REAP", "POLL", "CHECKPOINT", "NOTIFY_SWEEP")
}


@pytest.mark.parametrize("backend", ["sqlite"])  # beat reads no database
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_beat_signalled_mid_publish_finishes_it_and_exits(
    stack_factory, signum: signal.Signals
) -> None:
    # Given beat publishing through a proxy that holds Redis's replies back
    stack = stack_factory()
    with SlowReplies(stack.redis.port) as proxy:
        beat = start_procfile_process(
            stack,
            "beat",
            REFUNDQ_BROKER_URL=f"redis://127.0.0.1:{proxy.port}/{stack.redis_db}",
            **_EVERY_TENTH,
        )
        wait_for(
            lambda: beat.log().count("Sending due task") >= 2 or not beat.alive(),
            timeout=60,
            message=lambda: f"beat to publish:\n{beat.log()[-3000:]}",
        )
        assert beat.alive(), beat.log()[-3000:]
        proxy.hold_replies(seconds=1.0)

        # When the signal arrives while beat waits for the reply to a publish
        wait_for(proxy.reply_held.is_set, timeout=10, message="beat to wait for a reply")
        os.killpg(beat.popen.pid, signum)  # as honcho signals its processes

        # Then beat exits on its own (as it must within honcho's 5 s before SIGKILL; the deadline
        # here is looser because the test machines are shared), and nothing failed
        wait_for(
            lambda: not beat.alive(),
            timeout=15,
            message=lambda: f"beat to exit:\n{beat.log()[-3000:]}",
        )
    log = beat.log()
    assert beat.popen.returncode == 0, log[-3000:]
    assert "Couldn't apply scheduled task" not in log, log[-3000:]
    assert '"level": "error"' not in log, log[-3000:]
