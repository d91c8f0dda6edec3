"""The baseline: a bare Celery task that makes the same single HTTP call a vai247 refund makes,
and nothing else — no database, no state machine, no structured logs.

Same broker, same Celery settings (built by refundq's own `worker.app.celery_config`, so acks
late, prefetch 1, reject on worker lost, task events, time limits and serializer are whatever
refundq uses), same pool and concurrency (the bench starts both with the same command line), the
same POST to the same sandbox endpoint with the same headers and body shape, one `httpx.Client`
per worker process built when the process starts, as refundq does. The only extra work is one
RPUSH of "published_at finished_at status" into Redis, which is how the bench reads latencies.

    celery -A bench.baseline worker --pool prefork --concurrency 4
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import httpx
from celery import Celery
from celery.signals import celeryd_after_setup, setup_logging, worker_process_init

import worker.app as refundq_app
from worker.gateways import new_http_client
from worker.settings import get_settings

TASK = "bench.baseline.refund"
RESULTS_KEY = "bench:baseline:results"
REFUND_PATH = "/api/v1/payment-gateway/order/refund"

# Importing worker.app connected refundq's own signal receivers (JSON logging, database and
# gateway resets after fork, the warm-up rehearsal); a bare Celery app has none of them.
setup_logging.disconnect(refundq_app._logging)
worker_process_init.disconnect(refundq_app._after_fork)
celeryd_after_setup.disconnect(refundq_app._rehearse)


def bare_config(*, refundq_transport: bool = False) -> dict[str, Any]:
    """refundq's Celery settings without what is refundq's own: no beat schedule, Celery's
    default logging and, unless asked for, kombu's Redis transport rather than refundq's
    (worker/broker.py, one Redis client per channel instead of one per command). That saving
    is refundq's work, so the baseline keeps paying what a bare Celery app pays (BENCHMARKS.md,
    fourth round)."""
    config = refundq_app.celery_config(get_settings())
    config.pop("beat_schedule")
    if not refundq_transport:
        config.pop("broker_transport")
    # A bare worker logs the way Celery does by default (plain text at --loglevel).
    config.pop("worker_hijack_root_logger")
    return config


app = Celery("bench-baseline")
app.conf.update(bare_config())

_local: dict[str, Any] = {}
_lock = threading.Lock()


def clients() -> tuple[httpx.Client, Any]:
    """One HTTP client and one Redis client per process (rebuilt after fork)."""
    with _lock:
        if _local.get("pid") != os.getpid():
            import redis

            settings = get_settings()
            _local.clear()
            _local["pid"] = os.getpid()
            _local["http"] = new_http_client(settings)
            _local["redis"] = redis.Redis.from_url(settings.broker_url)
        return _local["http"], _local["redis"]


@worker_process_init.connect
def _warm(**_: Any) -> None:
    """Build the clients when the pool process starts, as refundq's pool processes build
    theirs (`worker.gateways.warm`): neither side pays for a TLS context inside a job."""
    clients()


def post_refund(http: httpx.Client, order_id: str) -> int:
    """The vai247 refund call, as refundq's provider makes it: its HTTP status."""
    body = json.dumps(
        {"order_id": order_id, "amount": "__AMOUNT__", "reason": "event cancelled"},
        separators=(",", ":"),
    ).replace('"__AMOUNT__"', "1.00")
    response = http.post(
        os.environ["REFUNDQ_VAI247_BASE_URL"].rstrip("/") + REFUND_PATH,
        content=body.encode(),
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "X-App-Id": os.environ["REFUNDQ_VAI247_APP_ID"],
            "X-Api-Key": os.environ["REFUNDQ_VAI247_API_KEY"],
            "X-Timestamp": str(int(time.time())),
        },
    )
    response.read()
    return response.status_code


# shared=False: a bench task must not join refundq's own app in a process that imports both.
@app.task(name=TASK, shared=False, acks_late=True, reject_on_worker_lost=True)
def refund(order_id: str, published_at: float) -> None:
    http, results = clients()
    status = post_refund(http, order_id)
    results.rpush(RESULTS_KEY, f"{published_at:.6f} {time.time():.6f} {status}")
