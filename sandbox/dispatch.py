"""The path every gateway call takes: read, identify, decide a fault, apply, answer, log.

Gateway modules supply three small functions per endpoint:

* `identify(body) -> Inbound`: parse the body (never raising) and name what the call is about, for
  fault matching and the call log;
* `apply(request, inbound) -> Reply`: check auth and business rules and change state. It is
  synchronous on purpose: nothing can interleave between its checks and its writes;
* `render(request, status, body, corrupt_signature) -> Response`: the bytes on the wire (pgv2 signs
  here; the others send plain JSON).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sandbox import wire
from sandbox.faults import NOT_APPLIED, FaultRule
from sandbox.state import Sandbox, utc_now

JSON_MEDIA_TYPE = "application/json"
# How many bytes a truncated response promises beyond what it sends. Any positive number makes
# the client wait for the rest until the connection closes under it.
TRUNCATION_SHORTFALL = 1024


@dataclass(frozen=True)
class Inbound:
    """A request body as parsed by a gateway module, and what the call is about."""

    body: Any = None
    error: str | None = None  # why the body could not be parsed; `body` is then None
    key: str | None = None
    payment_ref: str | None = None


@dataclass(frozen=True)
class Reply:
    """What the gateway answers, before it is encoded (and, for pgv2, signed)."""

    status: int
    payload: Any


class Refusal(Exception):
    """Raised inside `apply` to answer with `reply` (an auth failure, a business refusal).
    Nothing may have been changed before it is raised."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"HTTP {reply.status}")
        self.reply = reply


Identify = Callable[[bytes], Inbound]
Apply = Callable[[Request, Inbound], Reply]
Render = Callable[[Request, int, bytes, bool], Response]


def parse_json_body(body: bytes) -> tuple[Any, str | None]:
    """(parsed, None) or (None, reason)."""
    try:
        return wire.loads(body), None
    except wire.NotJson as exc:
        return None, str(exc)


def render_json(request: Request, status: int, body: bytes, corrupt_signature: bool) -> Response:
    """Plain JSON: the answer of every gateway but pgv2."""
    return Response(content=body, status_code=status, media_type=JSON_MEDIA_TYPE)


class TruncatedResponse(Response):
    """Sends the status line, headers promising more body than will ever come, and part of the
    body, then returns. uvicorn sees an unfinished response and closes the connection, so the
    client reads a connection that died mid-answer (httpx: `RemoteProtocolError`)."""

    def __init__(self, partial_body: bytes, status_code: int = 200) -> None:
        super().__init__(content=partial_body, status_code=status_code)
        self.partial_body = partial_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = len(self.partial_body) + TRUNCATION_SHORTFALL
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": [
                    (b"content-type", JSON_MEDIA_TYPE.encode()),
                    (b"content-length", str(declared).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.partial_body, "more_body": True})


def _format_seconds(seconds: float) -> str:
    # Retry-After is delta-seconds (an integer) in RFC 9110; keep fractions only when asked for
    # one, which lets tests use sub-second waits.
    return str(int(seconds)) if float(seconds).is_integer() else repr(seconds)


def fault_response(rule: FaultRule) -> Response:
    """The answer of a fault that stands in for the gateway (nothing applied)."""
    if rule.kind == "rate_limit":
        return Response(
            content=wire.dumps({"code": "RATE_LIMITED", "message": "injected rate limit"}),
            status_code=429,
            media_type=JSON_MEDIA_TYPE,
            headers={"Retry-After": _format_seconds(rule.retry_after)},
        )
    if rule.kind == "drop":
        return TruncatedResponse(b'{"')
    message = "injected outage" if rule.kind == "outage" else "injected error"
    return Response(
        content=wire.dumps({"code": "SANDBOX_FAULT", "message": message}),
        status_code=rule.error_status,
        media_type=JSON_MEDIA_TYPE,
    )


def malformed(body: bytes) -> bytes:
    """A strict prefix of a JSON object is never valid JSON: the answer was cut by a proxy."""
    return body[: len(body) // 2] or b"{"


async def serve_call(
    request: Request,
    *,
    sandbox: Sandbox,
    gateway: str,
    endpoint: str,
    identify: Identify,
    apply: Apply,
    render: Render = render_json,
) -> Response:
    """Handle one gateway call with fault injection and record it in the call log."""
    arrived = utc_now()
    inbound = identify(await request.body())
    rule = sandbox.faults.decide(gateway, endpoint, inbound.payment_ref, time.monotonic())
    fault = rule.kind if rule is not None else None
    http_status: int | None
    if rule is not None and rule.kind in NOT_APPLIED:
        response = fault_response(rule)
        http_status = None if rule.kind == "drop" else response.status_code
    else:
        if rule is not None and rule.kind == "latency":
            await asyncio.sleep((rule.spec.latency_ms or 0) / 1000)
        # From here to the end of `apply` nothing awaits: the checks and writes are atomic.
        try:
            reply = apply(request, inbound)
        except Refusal as refusal:
            reply = refusal.reply
        except Exception as exc:
            # A sandbox bug, not a gateway answer: still logged as a call, so a test counting
            # calls is not misled, then left to Starlette's 500.
            sandbox.calls.record(
                gateway,
                endpoint,
                at=arrived,
                fault=fault,
                key=inbound.key,
                payment_ref=inbound.payment_ref,
                http_status=500,
                error=f"{type(exc).__name__}: {exc}",
            )
            raise
        body = wire.dumps(reply.payload)
        if fault == "apply_then_drop":
            response = TruncatedResponse(body[: len(body) // 2])
            http_status = None
        else:
            http_status = reply.status
            if fault == "malformed":
                # Always 200: what a client cannot read must look like a possible success.
                body, http_status = malformed(body), 200
            response = render(request, http_status, body, fault == "bad_signature")
    sandbox.calls.record(
        gateway,
        endpoint,
        at=arrived,
        fault=fault,
        key=inbound.key,
        payment_ref=inbound.payment_ref,
        http_status=http_status,
    )
    return response
