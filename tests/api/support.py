"""What the HTTP API tests share: a shop's HTTP client, a notification receiver, and a signature
check written from the documentation (docs/http-api.md), not from refundq's code."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from tests.support.polling import wait_for
from tests.support.stack import Stack, unique

FINAL = {"succeeded", "declined", "failed", "unknown"}
NOTIFY_SECRET = "test-notify-secret"


def shop_client(stack: Stack, key: str | None) -> httpx.Client:
    """An HTTP client for `stack`'s API, sending `key` as its bearer token (if any)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=stack.api_url, headers=headers, timeout=20)


def order(stack: Stack, amount: str = "100.00", status: str = "completed") -> str:
    """A vai247 payment in the sandbox; returns its order id."""
    ref = unique("ord")
    stack.sandbox.create_payment("vai247", ref, amount, "USD", status=status)
    return ref


def refund_body(ref: str, amount: str = "50.00", **more: Any) -> dict[str, Any]:
    return {"provider": "vai247", "payment_ref": ref, "amount": amount, "currency": "USD", **more}


def wait_final(client: httpx.Client, job_id: str, timeout: float = 45.0) -> dict[str, Any]:
    """Follow the job over HTTP (`GET /v1/jobs/{id}`) until it is final or unknown."""
    last: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        answer = client.get(f"/v1/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        last.update(answer.json())
        return last if last["status"] in FINAL else None

    return wait_for(
        probe,
        timeout=timeout,
        interval=0.1,
        message=lambda: f"job {job_id} to be final over HTTP; it is {last.get('status')}",
    )


def verify_signature(secret: str, header: str, body: bytes, tolerance: float = 300) -> bool:
    """The check docs/http-api.md tells shops to make: HMAC-SHA256 over "<t>.<body>", and a
    timestamp that is recent."""
    fields = dict(item.split("=", 1) for item in header.split(","))
    timestamp = int(fields["t"])
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - timestamp) <= tolerance


@dataclass(frozen=True)
class Received:
    path: str
    headers: Message
    body: bytes
    at: float


class Receiver:
    """A shop's notification endpoint: records every POST, answers the given statuses in turn
    (then 200). A real HTTP server on loopback (Nagle off: see CELERY_NOTES.md)."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.requests: list[Received] = []
        self.answers = list(answers or [])
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, self.headers, body, time.time()))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                reply = b'{"received": true}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/refundq/notifications"

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def wait(self, count: int, timeout: float = 30.0) -> list[Received]:
        return wait_for(
            lambda: (got := self.received()) and len(got) >= count and got,
            timeout=timeout,
            message=lambda: f"{count} notification(s); got {len(self.received())}",
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
