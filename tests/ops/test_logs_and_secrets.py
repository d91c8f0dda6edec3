"""Logs and secrets, end to end. A sandbox of our own accepts only known credentials (vai247 API
key, bbmsl key pair, vaultspay client secret, pgv2 app secret) and records the gateway wire; the
Procfile's worker, beat, web and Flower run jobs through all four gateways, with faults that
cause errors, retries and ambiguity, an expired vaultspay token and a vaultspay callback. Redis
MONITOR sees every command on the broker. Then:

* every line the processes wrote is one JSON event, and gateway calls are logged with job id,
  provider, attempt and outcome;
* none of the credentials, nor what the wire carried (bearer tokens the gateway issued, pgv2
  `sign=` values both ways, bbmsl signatures, callback-URL tokens), nor any line of the private
  key, appears in a process log, in any message that crossed the broker (task bodies and events
  decoded), in what is left in Redis, in what Flower shows, or in the database.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from tests.ops.support import (
    BrokerMonitor,
    WireRecorder,
    credentials_on_the_wire,
    leaks,
    log_events,
    readable,
    redis_contents,
    start_procfile_process,
    wait_beat_started,
    wait_http_ok,
    wait_worker_ready,
)
from tests.support.polling import wait_for
from tests.support.sandbox import SandboxAdmin
from tests.support.services import RedisServer, free_port, free_ports
from tests.support.stack import Stack, unique
from worker.client import enqueue_cancel, enqueue_refund
from worker.logs import CELERY_PER_TASK_LOGGERS

FINAL = {"succeeded", "declined", "failed", "unknown"}


def _env(lines: list[str]) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in lines)
    return {name: value for name, value in pairs}


@dataclass
class SecretSandbox:
    base_url: str
    recorder: WireRecorder
    admin: SandboxAdmin
    env: dict[str, str]
    configured: dict[str, set[str]]


@pytest.fixture
def secret_sandbox(tmp_path: Path) -> Iterator[SecretSandbox]:
    """The simulators with credentials of this test's own, behind a wire recorder."""
    from sandbox.app import create_app
    from sandbox.config import SandboxConfig
    from sandbox.keys import generate_bbmsl_keypair
    from sandbox.serve import env_lines

    private_key, public_key = generate_bbmsl_keypair(tmp_path / "keys")
    known = {
        "vai247 api key": f"vai247-key-{secrets.token_hex(16)}",
        "vaultspay client secret": f"vaultspay-secret-{secrets.token_hex(16)}",
        "pgv2 app secret": f"pgv2-secret-{secrets.token_hex(16)}",
        "webhook secret": f"webhook-secret-{secrets.token_hex(16)}",
    }
    config = SandboxConfig(
        _env_file=None,  # type: ignore[call-arg]
        vai247_api_key=SecretStr(known["vai247 api key"]),
        vaultspay_client_secret=SecretStr(known["vaultspay client secret"]),
        pgv2_app_secret=SecretStr(known["pgv2 app secret"]),
        bbmsl_public_key=public_key.read_text(),
    )
    recorder = WireRecorder(create_app(config))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            recorder,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
        )
    )
    thread = threading.Thread(target=server.run, name="secret-sandbox", daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=15, message="the sandbox to start")
    base_url = f"http://127.0.0.1:{port}"
    env = _env(env_lines(base_url, config, private_key))
    env["REFUNDQ_WEBHOOK_SECRET"] = known["webhook secret"]
    pem_lines = {
        line
        for line in private_key.read_text().splitlines()
        if len(line) >= 16 and not line.startswith("-----")
    }
    configured = {kind: {value} for kind, value in known.items()}
    configured["bbmsl private key line"] = pem_lines
    try:
        yield SecretSandbox(base_url, recorder, SandboxAdmin(base_url), env, configured)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A broker for this test alone: MONITOR sees only its traffic."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _refund(sandbox: SecretSandbox, gateway: str, currency: str, fault: Any = None) -> str:
    ref = unique(gateway)
    sandbox.admin.create_payment(gateway, ref, "90.00", currency)
    if fault is not None:
        endpoint, kind, options = fault
        sandbox.admin.fault(gateway, endpoint, kind, payment_ref=ref, **options)
    job = enqueue_refund(
        provider=gateway,
        payment_ref=ref,
        amount="30.00",
        currency=currency,
        idempotency_key=unique("k"),
        original_amount="90.00",
        reason="Customer request",
    )
    return job.id


ONCE = {"times": 1}
CASES = [
    ("vai247", "USD", None),
    ("vai247", "USD", ("refund", "error", {"status": 503, **ONCE})),
    ("vai247", "USD", ("refund", "apply_then_drop", ONCE)),
    ("vai247", "USD", ("refund", "malformed", ONCE)),
    ("bbmsl", "HKD", None),
    ("bbmsl", "HKD", ("refund", "malformed", ONCE)),
    ("bbmsl", "HKD", ("refund", "error", {"status": 503, **ONCE})),
    ("vaultspay", "AED", ("create", "error", {"status": 503, **ONCE})),
    ("vaultspay", "AED", ("create", "apply_then_drop", ONCE)),
    ("pgv2", "INR", None),
    ("pgv2", "INR", ("refund", "bad_signature", ONCE)),
    ("pgv2", "INR", ("refund", "error", {"status": 503, **ONCE})),
    ("pgv2", "INR", ("refund", "malformed", ONCE)),
]


def _database_rows() -> list[str]:
    from sqlalchemy import MetaData, select

    from worker.db import get_engine

    engine = get_engine()
    metadata = MetaData()
    metadata.reflect(engine)
    rows: list[str] = []
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            rows.extend(repr(tuple(row)) for row in connection.execute(select(table)))
    return rows


def test_logs_are_json_events_and_no_secret_reaches_a_log_the_broker_or_flower(
    stack_factory, secret_sandbox: SecretSandbox, private_redis: RedisServer
):
    sandbox = secret_sandbox
    monitor = BrokerMonitor(private_redis.port)
    monitor.start()
    try:
        _run_and_check(stack_factory(redis=private_redis, **sandbox.env), sandbox, monitor)
    finally:
        monitor.stop()


def _run_and_check(stack: Stack, sandbox: SecretSandbox, monitor: BrokerMonitor) -> None:
    # Given the Procfile's worker, beat, web and Flower on this stack
    flower_password = secrets.token_hex(12)
    (flower_port,) = free_ports(1)
    worker = start_procfile_process(stack, "worker")
    beat = start_procfile_process(stack, "beat")
    web = start_procfile_process(stack, "web", PORT=str(stack.api_port))
    flower = start_procfile_process(
        stack,
        "flower",
        REFUNDQ_FLOWER_BASIC_AUTH=f"ops:{flower_password}",
        REFUNDQ_FLOWER_PORT=str(flower_port),
    )
    flower_url = f"http://127.0.0.1:{flower_port}"
    wait_worker_ready(worker)
    wait_beat_started(beat)
    wait_http_ok(f"{stack.api_url}/healthz", web)
    wait_http_ok(f"{flower_url}/healthcheck", flower)

    # When jobs go through all four gateways, with faults
    job_ids = [_refund(sandbox, gateway, currency, fault) for gateway, currency, fault in CASES]
    cancel_ref = unique("vai247")
    sandbox.admin.create_payment("vai247", cancel_ref, "20.00", "USD", status="pending")
    job_ids.append(
        enqueue_cancel(provider="vai247", payment_ref=cancel_ref, idempotency_key=unique("k")).id
    )
    # ...a vaultspay refund waits for the gateway; its token then expires under the worker...
    first = _refund(sandbox, "vaultspay", "AED")
    waiting = stack.wait_status(first, {"awaiting_gateway", *FINAL})
    assert waiting.status == "awaiting_gateway"
    sandbox.admin.post("/vaultspay/tokens/expire", {})
    second = _refund(sandbox, "vaultspay", "AED")
    assert stack.wait_status(second, {"awaiting_gateway", *FINAL}).status == "awaiting_gateway"
    # ...and the gateway calls back (to web, with the job's callback token in the URL).
    sandbox.admin.post(
        f"/vaultspay/refund-requests/{waiting.provider_reference}/status", {"status": 2}
    )
    assert stack.wait_status(first, FINAL).status == "succeeded"
    # (the poll may settle the job before the callback lands: wait for web to have logged it)
    wait_for(
        lambda: f"/webhooks/vaultspay/{first}." in web.log(),
        timeout=20,
        message=lambda: f"the callback to reach web:\n{web.log()[-2000:]}",
    )
    job_ids += [first, second]
    outcomes = {
        job_id: stack.wait_status(job_id, {"awaiting_gateway", *FINAL}) for job_id in job_ids
    }
    assert {v.status for v in outcomes.values()} >= {"succeeded", "unknown", "awaiting_gateway"}

    # Then every line each process wrote is one JSON event...
    logs = {p.name: p.log() for p in (worker, beat, web, flower)}
    # (web's first line is `refundq db upgrade` telling a person where the schema is)
    allowed = {"web": [r"^database at revision \S+$"]}
    events: dict[str, list[dict[str, Any]]] = {}
    for name, text in logs.items():
        events[name], strays = log_events(text, allow=allowed.get(name, []))
        assert events[name], f"{name} logged nothing"
        assert strays == [], f"{name} wrote lines that are not JSON events: {strays[:5]}"
    # ...gateway calls carry job id, provider, attempt and outcome...
    attempts = [e for e in events["worker"] if e.get("event") == "job.attempt"]
    for gateway in ("vai247", "bbmsl", "vaultspay", "pgv2"):
        mine = [e for e in attempts if e.get("provider") == gateway]
        assert mine, f"no job.attempt event for {gateway}"
        for event in mine:
            assert {"job_id", "attempt", "outcome"} <= event.keys(), event
            assert event["job_id"] in job_ids
    assert {e["outcome"] for e in attempts} >= {"succeeded", "not_sent", "ambiguous"}
    # ...and Celery's own line for each task received and done is left out at INFO: a turn is
    # its job.attempt line (worker/logs.py, issue 7).
    per_task = [e for e in events["worker"] if e.get("logger") in CELERY_PER_TASK_LOGGERS]
    assert [e for e in per_task if e.get("level") in {"debug", "info"}] == [], per_task[:3]
    # ...and the callback's access line shows the job but not its token.
    callbacks = [e for e in events["web"] if "/webhooks/vaultspay/" in e["event"]]
    assert callbacks and all(f"{first}.[redacted]" in e["event"] for e in callbacks), callbacks

    # And no secret is anywhere.
    wire = credentials_on_the_wire(sandbox.recorder.exchanges)
    assert len(wire["bearer token"]) >= 2, "expected a token before and after the expiry"
    for kind in ("pgv2 sign", "bbmsl signature", "callback token"):
        assert wire[kind], f"the wire carried no {kind}: the test would prove nothing"
    assert wire.pop("api key header") == sandbox.configured["vai247 api key"]
    wanted = {**sandbox.configured, **wire}

    with httpx.Client(auth=("ops", flower_password), timeout=10) as client:
        flower_views = [client.get(f"{flower_url}{p}").text for p in ("/api/tasks", "/api/workers")]
    monitor.stop()
    broker = readable(monitor.payloads())
    broker_client = stack.broker()
    left = readable(redis_contents(broker_client))
    # The capture is real: every job's task message is there, its body decoded.
    for job_id in job_ids:
        assert any(f'[["{job_id}"]' in text for text in broker), f"no task message for {job_id}"

    findings = leaks(
        wanted,
        {
            **{f"{name} log": [text] for name, text in logs.items()},
            "a broker message (MONITOR)": broker,
            "what is left in Redis": left,
            "Flower's API": flower_views,
            "the database": _database_rows(),
        },
    )
    assert findings == [], "\n".join(findings[:20])
