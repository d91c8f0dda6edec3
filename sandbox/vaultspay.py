"""vaultspay: merchant auth, refund request, refund request status, callback (seed 002;
docs/inferred-contracts.md#vaultspay).

A refund request is reviewed by VaultsPay's finance team within three working days, so it starts
at 0 (pending) and moves to 1 (initiated) and a final 2 (processed), 3 (cancelled) or 4
(rejected) later: here on an admin command, or by itself when auto-advance is configured. On 2 and
4 the gateway POSTs a callback to the request's `callbackHookUrl`. There is no idempotency key: a
repeated create is a second request for the same money, limited only by the refundable amount.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import re
import secrets
import time
import uuid as uuid_module
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from sandbox import wire
from sandbox.dispatch import Inbound, Refusal, Reply, parse_json_body, serve_call
from sandbox.state import LedgerEntry, Payment, Sandbox, utc_now

logger = logging.getLogger(__name__)

GATEWAY = "vaultspay"
PREFIX = "/public/external/v1"
AUTH_PATH = f"{PREFIX}/merchant-auth"
CREATE_PATH = f"{PREFIX}/create-refund-request"
STATUS_PATH = f"{PREFIX}/get-refund-request"

PENDING, INITIATED, PROCESSED, CANCELLED, REJECTED = 0, 1, 2, 3, 4
STATUS_STR = {
    PENDING: "Pending",
    INITIATED: "Initiated",
    PROCESSED: "Processed",
    CANCELLED: "Cancelled",
    REJECTED: "Rejected",
}
NOT_REFUNDED = frozenset({CANCELLED, REJECTED})
OPEN = frozenset({PENDING, INITIATED})
CALLBACK_STATUS = {PROCESSED: "SUCCESS", REJECTED: "REJECTED"}

AMOUNT_PATTERN = re.compile(r"\d{1,15}(\.\d{1,2})?")
INVALID_DATA = "The given data was invalid."
# Expired tokens are swept only once there are this many, so issuing stays O(1) in a benchmark.
TOKEN_SWEEP_THRESHOLD = 1000


def _refuse(status: int, message: str) -> Refusal:
    # vaultspay repeats the HTTP status as a string in `code`.
    return Refusal(Reply(status, {"message": message, "code": str(status), "data": None}))


def _ok(data: dict[str, Any]) -> Reply:
    return Reply(200, {"message": "Successful.", "code": "200", "data": data})


def _vaultspay_time(moment: datetime) -> str:
    # The seed shows "2021-10-05T10:42:48.000000Z": microseconds and a Z.
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AutoAdvance:
    """Moves a new request to 1 after `initiated_after_seconds` (if set) and to `final_status`
    after `final_after_seconds`, both counted from its creation."""

    final_after_seconds: float
    final_status: int = PROCESSED
    initiated_after_seconds: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "initiated_after_seconds": self.initiated_after_seconds,
            "final_after_seconds": self.final_after_seconds,
            "final_status": self.final_status,
        }


@dataclass
class RefundRequest:
    id: int
    uuid: str
    payment: Payment
    is_partial: bool
    amount: Decimal
    callback_url: str | None
    created_at: datetime
    created_monotonic: float
    ledger_entry: LedgerEntry
    vp_transaction_id: str
    status: int = PENDING
    schedule: AutoAdvance | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def data(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "transaction_id": self.payment.payment_ref,
            "amount": str(self.amount),
            "status": self.status,
            "description": "null",
            "status_str": STATUS_STR[self.status],
            "created_at": _vaultspay_time(self.created_at),
        }

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        self.schedule = None


def _config_auto_advance(sandbox: Sandbox) -> AutoAdvance | None:
    config = sandbox.config
    if config.vaultspay_auto_advance_final_after_seconds is None:
        return None
    return AutoAdvance(
        final_after_seconds=config.vaultspay_auto_advance_final_after_seconds,
        final_status=config.vaultspay_auto_advance_final_status,
        initiated_after_seconds=config.vaultspay_auto_advance_initiated_after_seconds,
    )


class Vaultspay:
    """The vaultspay simulator: tokens, refund requests, their life cycle and callbacks."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        config = sandbox.config
        self._client_id = config.vaultspay_client_id.encode()
        self._client_secret = config.vaultspay_client_secret.get_secret_value().encode()
        self.token_ttl_seconds = config.vaultspay_token_ttl_seconds
        self.auto_advance = _config_auto_advance(sandbox)
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._requests: dict[str, RefundRequest] = {}
        self._ids = itertools.count(1)
        self._http: httpx.AsyncClient | None = None
        sandbox.on_reset(self._reset)

    # ---- administration ----

    def settings_view(self) -> dict[str, Any]:
        return {
            "token_ttl_seconds": self.token_ttl_seconds,
            "auto_advance": self.auto_advance.view() if self.auto_advance else None,
        }

    def expire_tokens(self) -> int:
        """Every issued token is expired from now on; returns how many there were."""
        count = len(self._tokens)
        self._tokens = dict.fromkeys(self._tokens, float("-inf"))
        return count

    def request_view(self, refund_uuid: str) -> dict[str, Any] | None:
        request = self._requests.get(refund_uuid)
        if request is None:
            return None
        self._catch_up(request)
        return {
            **request.data(),
            "id": str(request.id),
            "is_partial": "1" if request.is_partial else "0",
            "callback_url": request.callback_url,
            "vp_transaction_id": request.vp_transaction_id,
            "auto_advance": request.schedule.view() if request.schedule else None,
        }

    def set_status(self, refund_uuid: str, status: int) -> bool:
        """Admin command: the finance team decided. Stops auto-advance for the request (the
        command wins) and fires the callback for 2 and 4, even when the status does not change,
        so a test can deliver the same callback twice. False if there is no such request."""
        request = self._requests.get(refund_uuid)
        if request is None:
            return False
        request.cancel_timers()
        self._set_status(request, status)
        return True

    def redeliver_callback(self, refund_uuid: str) -> str | None:
        """Send the callback of a request in 2 or 4 again; None, or why it cannot be sent."""
        request = self._requests.get(refund_uuid)
        if request is None:
            return "no such refund request"
        if request.callback_url is None:
            return "the refund request has no callbackHookUrl"
        if request.status not in CALLBACK_STATUS:
            return f"status {request.status} has no callback (only 2 and 4 do)"
        self.sandbox.spawn(self._deliver_callback(request, request.status))
        return None

    def catch_up_all(self) -> None:
        """Apply due auto-advance steps before state is read (timers may lag a busy loop)."""
        for request in self._requests.values():
            self._catch_up(request)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _reset(self, restore_settings: bool) -> None:
        for request in self._requests.values():
            request.cancel_timers()
        self._requests.clear()
        self._tokens.clear()
        self._ids = itertools.count(1)
        if restore_settings:
            self.token_ttl_seconds = self.sandbox.config.vaultspay_token_ttl_seconds
            self.auto_advance = _config_auto_advance(self.sandbox)

    # ---- the gateway ----

    def router(self) -> APIRouter:
        router = APIRouter(tags=["vaultspay"])

        async def auth(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="auth",
                identify=self._identify_auth,
                apply=self._auth,
            )

        async def create(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="create",
                identify=self._identify_create,
                apply=self._create,
            )

        async def status(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="status",
                identify=self._identify_status,
                apply=self._status,
            )

        router.add_api_route(AUTH_PATH, auth, methods=["POST"])
        router.add_api_route(CREATE_PATH, create, methods=["POST"])
        router.add_api_route(STATUS_PATH, status, methods=["POST"])
        return router

    @staticmethod
    def _identify_auth(raw: bytes) -> Inbound:
        body, error = parse_json_body(raw)
        return Inbound(body=body, error=error)

    @staticmethod
    def _identify_create(raw: bytes) -> Inbound:
        body, error = parse_json_body(raw)
        transaction_id = body.get("transactionId") if isinstance(body, dict) else None
        ref = transaction_id if isinstance(transaction_id, str) else None
        return Inbound(body=body, error=error, key=ref, payment_ref=ref)

    def _identify_status(self, raw: bytes) -> Inbound:
        body, error = parse_json_body(raw)
        refund_uuid = body.get("uuid") if isinstance(body, dict) else None
        if not isinstance(refund_uuid, str):
            return Inbound(body=body, error=error)
        request = self._requests.get(refund_uuid)
        payment_ref = request.payment.payment_ref if request else None
        return Inbound(body=body, error=error, key=refund_uuid, payment_ref=payment_ref)

    def _auth(self, request: Request, inbound: Inbound) -> Reply:
        body = inbound.body
        client_id = body.get("clientId") if isinstance(body, dict) else None
        client_secret = body.get("clientSecret") if isinstance(body, dict) else None
        if not isinstance(client_id, str) or not isinstance(client_secret, str):
            raise _refuse(422, INVALID_DATA)
        id_ok = hmac.compare_digest(client_id.encode(), self._client_id)
        secret_ok = hmac.compare_digest(client_secret.encode(), self._client_secret)
        if not (id_ok and secret_ok):
            raise _refuse(401, "Invalid client credentials.")
        now = time.monotonic()
        if len(self._tokens) >= TOKEN_SWEEP_THRESHOLD:
            self._tokens = {token: expiry for token, expiry in self._tokens.items() if expiry > now}
        token = secrets.token_urlsafe(32)
        self._tokens[token] = now + self.token_ttl_seconds
        return _ok({"access_token": token, "token_expiry": self.token_ttl_seconds})

    def _authenticate(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expiry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if expiry is None or expiry <= time.monotonic():
            raise _refuse(401, "Unauthenticated.")

    def _create(self, request: Request, inbound: Inbound) -> Reply:
        self._authenticate(request)
        body = inbound.body
        if not isinstance(body, dict):
            raise _refuse(422, INVALID_DATA)
        transaction_id = body.get("transactionId")
        is_partial = body.get("isPartial")
        raw_amount = body.get("amount")
        callback_url = body.get("callbackHookUrl")
        if (
            not isinstance(transaction_id, str)
            or not transaction_id
            or is_partial not in ("1", "0", None)
            or (raw_amount is not None and not isinstance(raw_amount, str))
            or (isinstance(raw_amount, str) and not AMOUNT_PATTERN.fullmatch(raw_amount))
            or (is_partial == "1" and raw_amount is None)
            or (callback_url is not None and not _is_http_url(callback_url))
        ):
            raise _refuse(422, INVALID_DATA)
        requested = Decimal(raw_amount) if raw_amount is not None else None
        if requested is not None and requested <= 0:
            raise _refuse(422, INVALID_DATA)
        payment = self.sandbox.payments.get(GATEWAY, transaction_id)
        if payment is None:
            raise _refuse(404, "Transaction not found.")
        partial = is_partial == "1"
        if partial:
            assert requested is not None
            if requested >= payment.amount:
                raise _refuse(422, "The amount must be less than the transaction full amount.")
            amount = requested
        else:
            # A full refund refunds the whole transaction; an amount, if sent, must say so.
            if requested is not None and requested != payment.amount:
                raise _refuse(422, INVALID_DATA)
            amount = payment.amount
        # Earlier requests count unless they ended cancelled or rejected.
        if amount > payment.refundable:
            raise _refuse(
                422, "The refund amount exceeds the refundable amount of the transaction."
            )
        return _ok(self._open_request(payment, amount, partial, callback_url))

    def _open_request(
        self, payment: Payment, amount: Decimal, partial: bool, callback_url: str | None
    ) -> dict[str, Any]:
        refund_uuid = f"RFRQ_{str(uuid_module.uuid4()).upper()}"
        entry = self.sandbox.ledger.record(
            GATEWAY, "refund", payment, amount, reference=refund_uuid, status=PENDING
        )
        request = RefundRequest(
            id=next(self._ids),
            uuid=refund_uuid,
            payment=payment,
            is_partial=partial,
            amount=amount,
            callback_url=callback_url,
            created_at=entry.at,
            created_monotonic=time.monotonic(),
            ledger_entry=entry,
            vp_transaction_id=f"RF_{secrets.token_hex(8).upper()}",
        )
        self._requests[refund_uuid] = request
        if self.auto_advance is not None:
            self._schedule(request, self.auto_advance)
        return {
            "id": str(request.id),
            "uuid": refund_uuid,
            "transaction_id": payment.payment_ref,
            "is_partial": "1" if partial else "0",
            "amount": str(amount),
            "description": "null",
            "created_at": _vaultspay_time(request.created_at),
        }

    def _status(self, request: Request, inbound: Inbound) -> Reply:
        self._authenticate(request)
        body = inbound.body
        refund_uuid = body.get("uuid") if isinstance(body, dict) else None
        if not isinstance(refund_uuid, str) or not refund_uuid:
            raise _refuse(422, INVALID_DATA)
        refund_request = self._requests.get(refund_uuid)
        if refund_request is None:
            raise _refuse(404, "Refund request not found.")
        self._catch_up(refund_request)
        return _ok(refund_request.data())

    # ---- life cycle ----

    def _schedule(self, request: RefundRequest, plan: AutoAdvance) -> None:
        # The settings are captured when the request is created: changing them later affects
        # only new requests, as a finance team's backlog would.
        request.schedule = plan
        loop = asyncio.get_running_loop()
        if plan.initiated_after_seconds is not None:
            request.timers.append(
                loop.call_later(plan.initiated_after_seconds, self._auto_initiate, request)
            )
        request.timers.append(loop.call_later(plan.final_after_seconds, self._auto_finish, request))

    def _auto_initiate(self, request: RefundRequest) -> None:
        if request.schedule is not None and request.status == PENDING:
            self._set_status(request, INITIATED)

    def _auto_finish(self, request: RefundRequest) -> None:
        plan = request.schedule
        if plan is not None and request.status in OPEN:
            request.schedule = None
            self._set_status(request, plan.final_status)

    def _catch_up(self, request: RefundRequest) -> None:
        plan = request.schedule
        if plan is None:
            return
        elapsed = time.monotonic() - request.created_monotonic
        if elapsed >= plan.final_after_seconds:
            self._auto_finish(request)
        elif plan.initiated_after_seconds is not None and elapsed >= plan.initiated_after_seconds:
            self._auto_initiate(request)

    def _set_status(self, request: RefundRequest, status: int) -> None:
        request.status = status
        self.sandbox.ledger.update_status(
            request.ledger_entry, status, effective=status not in NOT_REFUNDED
        )
        if status in CALLBACK_STATUS and request.callback_url is not None:
            self.sandbox.spawn(self._deliver_callback(request, status))

    async def _deliver_callback(self, request: RefundRequest, status: int) -> None:
        """POST the documented callback body once; the outcome goes to the call log. A failure
        is the receiver's problem, never the sandbox's."""
        assert request.callback_url is not None
        body = {
            "vpTransactionId": request.vp_transaction_id,
            "clientReference": request.uuid,
            "amount": str(request.amount),
            "fee": "0",
            "vat": "0",
            "status": CALLBACK_STATUS[status],
            "referenceId": request.uuid,
        }
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.sandbox.config.vaultspay_callback_timeout_seconds
            )
        at = utc_now()
        http_status: int | None = None
        error: str | None = None
        try:
            response = await self._http.post(
                request.callback_url,
                content=wire.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            http_status = response.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("vaultspay callback for %s failed: %s", request.uuid, error)
        self.sandbox.calls.record(
            GATEWAY,
            "callback",
            at=at,
            fault=None,
            key=request.uuid,
            payment_ref=request.payment.payment_ref,
            http_status=http_status,
            error=error,
        )


def _is_http_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))
