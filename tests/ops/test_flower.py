"""Flower as the Procfile runs it (flowerconfig.py): against the test broker it shows a job's
task by its readable name with the job id as its only argument, and its state; it answers only
with the credentials from REFUNDQ_FLOWER_BASIC_AUTH, and refuses every command (revoke,
terminate, apply, worker shutdown) because it is read-only."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.ops.support import (
    FLOWER_CONFIG,
    log_events,
    start_procfile_process,
    wait_http_ok,
)
from tests.support.polling import wait_for
from tests.support.services import free_ports
from tests.support.stack import REPO, unique
from worker.client import enqueue_refund

# A job id (uuid4 hex) as the one argument, as Flower shows it (argsrepr).
JOB_ID_ARGS = re.compile(r"^\['[0-9a-f]{32}'\]$")


def refundq_tasks() -> set[str]:
    """The tasks the worker registers: all named `refundq.<what it does>`."""
    import tasks  # noqa: F401 - registers them
    from worker.app import app

    names = {name for name in app.tasks if not name.startswith("celery.")}
    assert names and all(re.fullmatch(r"refundq\.[a-z_]+", name) for name in names), names
    return names


def _tasks(flower: str, auth: tuple[str, str], **params: str) -> dict[str, Any]:
    response = httpx.get(f"{flower}/api/tasks", params=params, auth=auth, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_flower_shows_a_job_by_name_and_id_only_behind_basic_auth_and_read_only(stack_factory):
    # Given a worker and beat on the test broker, and Flower started by the Procfile's command
    stack = stack_factory()
    password = secrets.token_hex(12)
    auth = ("ops", password)
    (flower_port,) = free_ports(1)
    worker = stack.start_worker()
    stack.start_beat()
    flower_process = start_procfile_process(
        stack,
        "flower",
        REFUNDQ_FLOWER_BASIC_AUTH=f"{auth[0]}:{auth[1]}",
        REFUNDQ_FLOWER_PORT=str(flower_port),
    )
    flower = f"http://127.0.0.1:{flower_port}"
    wait_http_ok(f"{flower}/healthcheck", flower_process)  # the one page without auth
    # Flower listens to task events once it is up; beat's ticks show when it does.
    wait_for(
        lambda: _tasks(flower, auth, taskname="refundq.dispatch_queued"),
        timeout=30,
        message="Flower to see beat's tasks",
    )

    # When a job runs
    ref = unique("vai247")
    stack.sandbox.create_payment("vai247", ref, "40.00", "USD")
    job = enqueue_refund(
        provider="vai247",
        payment_ref=ref,
        amount="12.50",
        currency="USD",
        idempotency_key=unique("k"),
    )
    assert stack.wait_status(job.id, {"succeeded", "declined", "failed", "unknown"}).status == (
        "succeeded"
    )

    # Then Flower's API finds its task by name, with the job id as the only argument
    def job_task() -> dict[str, Any] | None:
        task = _tasks(flower, auth, taskname="refundq.execute_job").get(job.id)
        return task if task and task.get("state") == "SUCCESS" else None

    task = wait_for(job_task, timeout=30, message=lambda: f"Flower to show {job.id} succeeded")
    assert task["name"] == "refundq.execute_job"
    assert (task["args"], task["kwargs"]) == (repr([job.id]), "{}")
    info = httpx.get(f"{flower}/api/task/info/{job.id}", auth=auth, timeout=10).json()
    assert (info["name"], info["state"], info["args"]) == (
        "refundq.execute_job",
        "SUCCESS",
        repr([job.id]),
    )
    # ...and every task it knows is refundq's, named, with a job id or nothing as arguments
    # (a task that was already under way when Flower subscribed has no name: Flower never saw
    # it sent or received, mher/flower#322; it has no arguments either).
    every = {i: t for i, t in _tasks(flower, auth).items() if t["name"] is not None}
    assert {t["name"] for t in every.values()} <= refundq_tasks(), every
    for seen in every.values():
        assert seen["kwargs"] == "{}", seen
        assert seen["args"] in ("()", "[]") or JOB_ID_ARGS.match(seen["args"]), seen

    # Without credentials, or with wrong ones, nothing is shown.
    for path in ("/api/tasks", "/api/workers", "/", "/tasks"):
        assert httpx.get(flower + path, timeout=10).status_code == 401, path
        assert httpx.get(flower + path, auth=("ops", "wrong"), timeout=10).status_code == 401

    # Read-only: revoke, terminate, apply, send and worker control are all refused.
    worker_name = f"w1@{socket.gethostname()}"  # start_worker's --hostname w1@%h
    commands = [
        (f"/api/task/revoke/{job.id}", {"terminate": "true"}),
        (f"/api/task/revoke/{job.id}", {}),
        ("/api/task/async-apply/refundq.execute_job", {"args": [job.id]}),
        ("/api/task/send-task/refundq.execute_job", {"args": [job.id]}),
        (f"/api/task/abort/{job.id}", {}),
        (f"/api/worker/shutdown/{worker_name}", {}),
        (f"/api/worker/pool/restart/{worker_name}", {}),
    ]
    for path, body in commands:
        response = httpx.post(flower + path, json=body, auth=auth, timeout=10)
        assert response.status_code == 403, (path, response.status_code, response.text)
        assert "read only" in response.text.lower(), response.text
    assert worker.alive()

    # Flower logs JSON lines like every refundq process, and never the password.
    flower_log = flower_process.log()
    events, strays = log_events(flower_log)
    assert events and strays == [], strays[:5]
    assert password not in flower_log


def test_flower_refuses_to_start_without_credentials(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFUNDQ_", "FLOWER_"))}
    (port,) = free_ports(1)
    for credentials in (None, "ops", ":secret"):
        run_env = {**env, "PYTHONPATH": str(REPO)}
        if credentials is not None:
            run_env["REFUNDQ_FLOWER_BASIC_AUTH"] = credentials
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "--quiet",
                "flower",
                f"--conf={FLOWER_CONFIG}",
                f"--port={port}",
            ],
            cwd=tmp_path,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0, credentials
        assert "REFUNDQ_FLOWER_BASIC_AUTH" in result.stderr, result.stderr


def test_flower_settings_hold_against_flowers_own_environment_variables():
    # FLOWER_* variables apply before the config file, so the file's safety settings win.
    code = (
        "import json, os, sys\n"
        "from tornado.options import options\n"
        "import flower.options\n"
        "from flower.command import apply_env_options, apply_options\n"
        "apply_env_options()\n"
        f"apply_options('flower', ['--conf={FLOWER_CONFIG}'])\n"
        "print(json.dumps({k: getattr(options, k) for k in "
        "('read_only', 'max_tasks', 'persistent', 'basic_auth', 'address')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFUNDQ_", "FLOWER_"))}
    env.update(
        PYTHONPATH=str(REPO),
        REFUNDQ_FLOWER_BASIC_AUTH="ops:right",
        FLOWER_READ_ONLY="false",
        FLOWER_MAX_TASKS="100000",
        FLOWER_PERSISTENT="true",
        FLOWER_BASIC_AUTH="intruder:pw",
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    options = json.loads(result.stdout.splitlines()[-1])
    assert options == {
        "read_only": True,
        "max_tasks": 10000,
        "persistent": False,
        "basic_auth": ["ops:right"],
        "address": "127.0.0.1",
    }
