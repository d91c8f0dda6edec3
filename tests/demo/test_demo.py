"""`refundq demo` as a newcomer runs it: a subprocess that starts its own sandbox, worker, beat
and webhook, drives a mix of jobs across the four gateways, judges every one against its expected
state, and leaves no process behind. The broker is the test session's private Redis."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.polling import wait_for
from tests.support.services import RedisServer, free_port
from tests.support.stack import REPO
from worker.demo import LOCAL_REDIS_ENV, Children, find_broker, scenarios

# Far above the logical databases the integration stacks take (1, 2, 3, ...).
DEMO_DB = 9000
WORKDIR = re.compile(r"database: (\S+)/refundq\.db")


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDQ_")}
    # Wide enough that no row of the final table wraps.
    return {**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "COLUMNS": "320", **extra}


def run_demo(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def processes_in(workdir: str) -> list[int]:
    """Live processes whose working directory is the demo's (every child the demo starts)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == workdir or cwd.startswith((workdir + "/", workdir + " ")):
            found.append(int(entry.name))
    return found


def describe(pids: list[int]) -> list[str]:
    """Each process as `pid: command line (state)`, for a failure message."""
    described = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            argv, state = "?", "gone"
        described.append(f"{pid}: {argv.strip()} ({state})")
    return described


def final_rows(output: str) -> dict[int, str]:
    """The final table's rows by scenario number (the first line of each row)."""
    _before, _marker, table = output.partition("final states")
    rows: dict[int, str] = {}
    for line in table.splitlines():
        match = re.match(r"│\s*(\d+)\s*│", line)
        if match:
            rows[int(match.group(1))] = line
    return rows


@pytest.mark.slow
def test_the_demo_brings_every_scenario_to_its_expected_state_and_stops_everything(
    redis_server: RedisServer,
):
    started = time.monotonic()

    result = run_demo(demo_env(REFUNDQ_BROKER_URL=redis_server.url_for(DEMO_DB)))

    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    rows = final_rows(result.stdout)
    expected = {s.number: s for s in scenarios()}
    assert sorted(rows) == sorted(expected), output
    for number, row in rows.items():
        assert "✓" in row and "✗" not in row, f"scenario {number} did not match:\n{output}"
        assert expected[number].gateway in row
    assert f"all {len(expected)} jobs reached their expected state" in result.stdout
    # The scenarios the issue names, as the table shows them.
    assert "declined ORDER_NOT_CANCELLABLE" in rows[4] and "completed orders must be" in output
    assert "declined 3002" in rows[8] and "3002: Order already refunded" in rows[8]
    assert "succeeded after 2 tries" in rows[9].split("│")[6]
    assert "succeeded by poll" in rows[11].split("│")[6]
    assert "succeeded by callback" in rows[12].split("│")[6]
    assert "unknown" in rows[5].split("│")[6]
    assert f"database {DEMO_DB} as given" in output
    assert redis_server.client(DEMO_DB).dbsize() == 0  # the borrowed database is empty again
    assert "demo timings" in output
    # Nothing left running, nothing left behind.
    workdir = WORKDIR.search(output)
    assert workdir, output
    assert processes_in(workdir.group(1)) == []
    assert not Path(workdir.group(1)).exists()
    assert elapsed < 60, f"the demo took {elapsed:.1f} s"
    print(f"\nrefundq demo took {elapsed:.1f} s")


def test_without_any_redis_the_demo_says_how_to_get_one(tmp_path: Path):
    nothing_here = f"redis://127.0.0.1:{free_port()}"
    env = demo_env(
        REFUNDQ_BROKER_URL=f"{nothing_here}/0",
        # This machine has a Redis on localhost:6379; the demo must not find it here.
        **{LOCAL_REDIS_ENV: nothing_here},
        PATH=str(tmp_path),  # and no redis-server to start
    )

    result = run_demo(env, timeout=60)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "needs Redis" in output
    assert f"REFUNDQ_BROKER_URL={nothing_here}/0 does not answer" in output
    assert "redis-server is not installed" in output
    assert "sudo apt-get install redis-server" in output
    assert "export REFUNDQ_BROKER_URL=redis://HOST:6379/0" in output
    assert "Traceback" not in output


def start_demo_until_enqueued(
    redis_server: RedisServer, db: int
) -> tuple[subprocess.Popen[str], list[str], str]:
    """`refundq demo` as a child, read up to the line saying its jobs are enqueued (its
    processes all run by then): the child, the lines read, and the demo's work directory."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "demo"],
        cwd=REPO,
        env=demo_env(REFUNDQ_BROKER_URL=redis_server.url_for(db)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "enqueued" in line:
                break
        workdir = WORKDIR.search("".join(lines))
        assert workdir, "".join(lines)
    except BaseException:
        demo.kill()
        demo.wait(timeout=10)
        raise
    return demo, lines, workdir.group(1)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_the_demo_started(redis_server: RedisServer):
    demo, lines, workdir = start_demo_until_enqueued(redis_server, DEMO_DB + 1)
    try:
        assert processes_in(workdir), "the demo's processes should be running"

        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    output = "".join(lines) + rest
    assert demo.returncode == 130, output
    assert "interrupted" in output
    assert processes_in(workdir) == []


@pytest.mark.slow
def test_a_demo_killed_outright_takes_its_processes_with_it(redis_server: RedisServer):
    demo, _lines, workdir = start_demo_until_enqueued(redis_server, DEMO_DB + 2)
    try:
        demo.kill()  # SIGKILL: no finally, no cleanup in the demo itself
        demo.wait(timeout=10)
        wait_for(
            lambda: processes_in(workdir) == [],
            timeout=30,
            message=lambda: f"the demo's children to exit: {describe(processes_in(workdir))}",
        )
    finally:
        if demo.poll() is None:
            demo.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_shared_redis_gets_a_logical_database_nobody_uses(
    redis_server: RedisServer, tmp_path: Path
):
    busy = DEMO_DB + 3
    redis_server.client(busy).set("someone-elses", "data")
    try:
        broker = find_broker(
            Children(tmp_path),
            {"REFUNDQ_BROKER_URL": redis_server.url_for(busy)},
            say=lambda _message: None,
        )
    finally:
        redis_server.client(busy).delete("someone-elses")
    chosen = int(broker.url.rsplit("/", 1)[1])
    assert chosen != busy and 1 <= chosen <= 15
    assert redis_server.client(chosen).dbsize() == 0
    assert f"logical database {chosen}, which nobody else uses" in broker.story


def test_without_a_running_redis_the_demo_starts_a_private_one(tmp_path: Path):
    children = Children(tmp_path)
    broker = find_broker(
        children, {LOCAL_REDIS_ENV: f"redis://127.0.0.1:{free_port()}"}, say=lambda _m: None
    )
    try:
        import redis

        assert redis.Redis.from_url(broker.url).ping()
        assert "private redis-server" in broker.story
    finally:
        assert children.stop_all() == 1
    assert all(not child.alive() for child in children.started)


MISMATCH = """
import sys
from worker import demo
from worker.demo import Expected, Scenario

demo.scenarios = lambda: [
    Scenario(1, "vai247", "full refund", "refund", "80.00", "USD",
             Expected("succeeded", applied=1), "order 80.00 USD", amount="80.00"),
    # Wrong on purpose: the gateway accepts this cancel.
    Scenario(2, "vai247", "cancel, order pending", "cancel", "60.00", "USD",
             Expected("declined", applied=0), "order pending", payment_status="pending"),
]
sys.exit(demo.run_demo())
"""


@pytest.mark.slow
def test_a_job_that_misses_its_expected_state_fails_the_demo_and_shows_the_logs(
    redis_server: RedisServer,
):
    result = subprocess.run(
        [sys.executable, "-c", MISMATCH],
        cwd=REPO,
        env=demo_env(REFUNDQ_BROKER_URL=redis_server.url_for(DEMO_DB + 4)),
        capture_output=True,
        text=True,
        timeout=120,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    rows = final_rows(result.stdout)
    assert "✓" in rows[1]
    assert "✗" in rows[2] and "succeeded" in rows[2].split("│")[6]
    assert "1 of 2 jobs did not reach their expected state" in output
    for child in ("sandbox", "worker", "beat"):
        assert f"{child}: last 25 lines of" in output
    kept = re.search(r"logs, database and keys kept in (\S+)", output)
    assert kept, output
    workdir = kept.group(1)
    assert (Path(workdir) / "worker.log").exists()
    assert processes_in(workdir) == []
    shutil.rmtree(workdir)
