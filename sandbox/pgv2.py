"""pgv2: refund create and refund inquiry with V2_SHA256 signatures (seed 003;
docs/inferred-contracts.md#pgv2).

Requests carry `Authorization: V2_SHA256 appId=…,sign=…,timestamp=<ms>,nonce=<32 hex>`, where
`sign` is the lowercase hex SHA-256 of seven lines (appId, appSecret, method, full URL, timestamp,
nonce, body), each ending in a newline. Every answer is HTTP 200 JSON `{code, errorMessage, data}`
signed the same way with the answer's own timestamp and nonce over the answer's body bytes
(GATEWAYS.md: the project's fixed assumption). A refund is PROCESSING, then SUCCESS after the
settle delay or an admin command, or FAILED on an admin command.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import re
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from sandbox.config import DuplicateMode
from sandbox.dispatch import (
    JSON_MEDIA_TYPE,
    Inbound,
    Refusal,
    Reply,
    parse_json_body,
    serve_call,
)
from sandbox.state import LedgerEntry, Payment, Sandbox, utc_now

GATEWAY = "pgv2"
CREATE_PATH = "/pg/v2/refund/create"
QUERY_PATH = "/pg/v2/refund/query"
SCHEME = "V2_SHA256"

PROCESSING, SUCCESS, FAILED = "PROCESSING", "SUCCESS", "FAILED"
AMOUNT_PATTERN = re.compile(r"\d{1,15}\.\d{2}")
NONCE_PATTERN = re.compile(r"[0-9A-Fa-f]{32}")
MAX_NO_LENGTH = 50
MAX_DESCRIPTION_LENGTH = 80


def string_to_sign(
    *,
    app_id: str,
    app_secret: str,
    method: str,
    url: str,
    timestamp: str,
    nonce: str,
    body: bytes,
) -> bytes:
    """The seven lines, each ending in a newline; the body is used byte for byte."""
    head = f"{app_id}\n{app_secret}\n{method}\n{url}\n{timestamp}\n{nonce}\n".encode()
    return head + body + b"\n"


def v2_sign(
    *, app_id: str, app_secret: str, method: str, url: str, timestamp: str, nonce: str, body: bytes
) -> str:
    """Lowercase hex SHA-256 of the string to sign (requests and responses alike)."""
    message = string_to_sign(
        app_id=app_id,
        app_secret=app_secret,
        method=method,
        url=url,
        timestamp=timestamp,
        nonce=nonce,
        body=body,
    )
    return hashlib.sha256(message).hexdigest()


def parse_authorization(value: str) -> dict[str, str] | None:
    """`V2_SHA256 appId=…,sign=…,timestamp=…,nonce=…` as a dict; None if it is not that."""
    scheme, _, credentials = value.strip().partition(" ")
    if scheme != SCHEME:
        return None
    fields: dict[str, str] = {}
    for item in credentials.split(","):
        name, separator, item_value = item.strip().partition("=")
        if not separator:
            return None
        fields[name] = item_value
    if not {"appId", "sign", "timestamp", "nonce"} <= fields.keys():
        return None
    return fields


def _refuse(code: str, message: str) -> Refusal:
    return Refusal(Reply(200, {"code": code, "errorMessage": message, "data": None}))


def _sign_error(message: str) -> Refusal:
    return _refuse("SIGN_ERROR", message)


def _param_error(message: str) -> Refusal:
    return _refuse("PARAM_ERROR", message)


def _ok(data: dict[str, Any]) -> Reply:
    return Reply(200, {"code": "OK", "errorMessage": None, "data": data})


@dataclass(frozen=True)
class Pgv2Body:
    """The raw bytes (what the signature covers) and their parse."""

    raw: bytes
    parsed: Any


@dataclass
class Pgv2Refund:
    refund_no: str
    merchant_refund_no: str
    payment: Payment
    amount: str  # as the merchant sent it: exactly 2 decimals
    created_monotonic: float
    ledger_entry: LedgerEntry
    status: str = PROCESSING

    def data(self) -> dict[str, Any]:
        return {
            "refundNo": self.refund_no,
            "paymentNo": self.payment.payment_ref,
            "merchantRefundNo": self.merchant_refund_no,
            "amount": self.amount,
            "currency": self.payment.currency,
        }


class Pgv2:
    """The pgv2 simulator: signatures both ways, nonces, refunds and their settlement."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        config = sandbox.config
        self._app_id = config.pgv2_app_id
        self._app_secret = config.pgv2_app_secret.get_secret_value()
        self._skew_ms = config.pgv2_timestamp_skew_seconds * 1000
        self._nonce_window = config.pgv2_nonce_window_seconds
        self.duplicate_mode: DuplicateMode = config.pgv2_duplicate_mode
        self.settle_after_seconds = config.pgv2_settle_after_seconds
        # Nonces seen inside the window: a set for the lookup, a queue in arrival order so
        # expired ones are dropped from the front without scanning.
        self._nonces: set[str] = set()
        self._nonce_queue: collections.deque[tuple[float, str]] = collections.deque()
        self._by_merchant_no: dict[str, Pgv2Refund] = {}
        self._by_refund_no: dict[str, Pgv2Refund] = {}
        self._sequence = itertools.count(1)
        sandbox.on_reset(self._reset)

    # ---- administration ----

    def settings_view(self) -> dict[str, Any]:
        return {
            "duplicate_mode": self.duplicate_mode,
            "settle_after_seconds": self.settle_after_seconds,
        }

    def refund_view(self, merchant_refund_no: str) -> dict[str, Any] | None:
        refund = self._by_merchant_no.get(merchant_refund_no)
        if refund is None:
            return None
        self._settle_if_due(refund)
        return {**refund.data(), "status": refund.status}

    def set_status(self, merchant_refund_no: str, status: str) -> bool:
        """Admin command: SUCCESS or FAILED now. False if there is no such refund."""
        refund = self._by_merchant_no.get(merchant_refund_no)
        if refund is None:
            return False
        self._set_status(refund, status)
        return True

    def settle_all_due(self) -> None:
        """Apply due settlements before state is read (they happen lazily)."""
        for refund in self._by_merchant_no.values():
            self._settle_if_due(refund)

    def _reset(self, restore_settings: bool) -> None:
        self._nonces.clear()
        self._nonce_queue.clear()
        self._by_merchant_no.clear()
        self._by_refund_no.clear()
        self._sequence = itertools.count(1)
        if restore_settings:
            self.duplicate_mode = self.sandbox.config.pgv2_duplicate_mode
            self.settle_after_seconds = self.sandbox.config.pgv2_settle_after_seconds

    # ---- the gateway ----

    def router(self) -> APIRouter:
        router = APIRouter(tags=["pgv2"])

        async def create(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="refund",
                identify=self._identify,
                apply=self._create,
                render=self._render,
            )

        async def query(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="query",
                identify=self._identify,
                apply=self._query,
                render=self._render,
            )

        router.add_api_route(CREATE_PATH, create, methods=["POST"])
        router.add_api_route(QUERY_PATH, query, methods=["POST"])
        return router

    def _identify(self, raw: bytes) -> Inbound:
        parsed, error = parse_json_body(raw)
        body = Pgv2Body(raw, parsed)
        if not isinstance(parsed, dict):
            return Inbound(body=body, error=error)
        merchant_refund_no = parsed.get("merchantRefundNo")
        refund_no = parsed.get("refundNo")
        payment_no = parsed.get("paymentNo")
        refund = None
        if isinstance(merchant_refund_no, str):
            refund = self._by_merchant_no.get(merchant_refund_no)
        elif isinstance(refund_no, str):
            refund = self._by_refund_no.get(refund_no)
        key = refund.merchant_refund_no if refund else None
        key = key or next(
            (value for value in (merchant_refund_no, refund_no) if isinstance(value, str)), None
        )
        payment_ref = payment_no if isinstance(payment_no, str) else None
        if refund is not None:
            payment_ref = refund.payment.payment_ref
        return Inbound(body=body, error=error, key=key, payment_ref=payment_ref)

    def _render(
        self, request: Request, status: int, body: bytes, corrupt_signature: bool
    ) -> Response:
        timestamp = str(time.time_ns() // 1_000_000)
        nonce = secrets.token_hex(16).upper()
        sign = v2_sign(
            app_id=self._app_id,
            app_secret=self._app_secret,
            method=request.method,
            url=str(request.url),
            timestamp=timestamp,
            nonce=nonce,
            body=body,
        )
        if corrupt_signature:
            # Well-formed but wrong: a client must compute the sign to notice.
            sign = hashlib.sha256(sign.encode()).hexdigest()
        authorization = (
            f"{SCHEME} appId={self._app_id},sign={sign},timestamp={timestamp},nonce={nonce}"
        )
        return Response(
            content=body,
            status_code=status,
            media_type=JSON_MEDIA_TYPE,
            headers={"Authorization": authorization},
        )

    def _verify(self, request: Request, inbound: Inbound) -> dict[str, Any]:
        """Signature, timestamp and nonce; then the body as an object."""
        body = inbound.body
        assert isinstance(body, Pgv2Body)
        header = request.headers.get("authorization")
        if header is None:
            raise _sign_error("Authorization header is missing")
        fields = parse_authorization(header)
        if fields is None:
            raise _sign_error("Authorization header is not V2_SHA256 appId,sign,timestamp,nonce")
        if fields["appId"] != self._app_id:
            raise _sign_error("Unknown appId")
        timestamp, nonce = fields["timestamp"], fields["nonce"]
        if not timestamp.isdigit() or not NONCE_PATTERN.fullmatch(nonce):
            raise _sign_error("timestamp must be unix milliseconds and nonce 32 hex characters")
        if abs(time.time() * 1000 - int(timestamp)) > self._skew_ms:
            raise _sign_error("timestamp is more than 5 minutes off")
        expected = v2_sign(
            app_id=self._app_id,
            app_secret=self._app_secret,
            method=request.method,
            url=str(request.url),
            timestamp=timestamp,
            nonce=nonce,
            body=body.raw,
        )
        if not hmac.compare_digest(fields["sign"], expected):
            raise _sign_error("sign does not match")
        # Only a correctly signed request consumes its nonce; otherwise anyone could burn
        # nonces a merchant has yet to use.
        self._remember_nonce(nonce)
        if not isinstance(body.parsed, dict):
            raise _param_error("body must be a JSON object")
        return body.parsed

    def _remember_nonce(self, nonce: str) -> None:
        now = time.monotonic()
        horizon = now - self._nonce_window
        while self._nonce_queue and self._nonce_queue[0][0] < horizon:
            self._nonces.discard(self._nonce_queue.popleft()[1])
        if nonce in self._nonces:
            raise _refuse("NONCE_REUSED", "nonce was already used")
        self._nonces.add(nonce)
        self._nonce_queue.append((now, nonce))

    def _create(self, request: Request, inbound: Inbound) -> Reply:
        fields = self._verify(request, inbound)
        merchant_refund_no = _text(fields, "merchantRefundNo", MAX_NO_LENGTH)
        payment_no = _text(fields, "paymentNo", MAX_NO_LENGTH)
        _text(fields, "description", MAX_DESCRIPTION_LENGTH)
        amount_text = fields.get("amount")
        if not isinstance(amount_text, str) or not AMOUNT_PATTERN.fullmatch(amount_text):
            raise _param_error("amount must be 1-15 digits and exactly 2 decimals, as a string")
        amount = Decimal(amount_text)
        if amount <= 0:
            raise _param_error("amount must be positive")
        existing = self._by_merchant_no.get(merchant_refund_no)
        if existing is not None:
            if self.duplicate_mode == "refuse":
                raise _refuse(
                    "DUPLICATE_MERCHANT_REFUND_NO",
                    f"merchantRefundNo {merchant_refund_no} was already used",
                )
            return _ok(existing.data())
        payment = self.sandbox.payments.get(GATEWAY, payment_no)
        if payment is None:
            raise _refuse("PAYMENT_NOT_FOUND", f"payment {payment_no} not found")
        if payment.status != "ok":
            raise _refuse("PAYMENT_NOT_REFUNDABLE", f"payment {payment_no} is {payment.status}")
        if amount > payment.refundable:
            raise _refuse(
                "REFUND_AMOUNT_EXCEEDED",
                f"refund of {amount_text} exceeds the refundable {payment.refundable}",
            )
        refund_no = f"{utc_now():%Y%m%d%H%M%S}{next(self._sequence):018d}"
        entry = self.sandbox.ledger.record(
            GATEWAY,
            "refund",
            payment,
            amount,
            reference=refund_no,
            status=PROCESSING,
            merchant_reference=merchant_refund_no,
        )
        refund = Pgv2Refund(
            refund_no=refund_no,
            merchant_refund_no=merchant_refund_no,
            payment=payment,
            amount=amount_text,
            created_monotonic=time.monotonic(),
            ledger_entry=entry,
        )
        self._by_merchant_no[merchant_refund_no] = refund
        self._by_refund_no[refund_no] = refund
        return _ok(refund.data())

    def _query(self, request: Request, inbound: Inbound) -> Reply:
        fields = self._verify(request, inbound)
        merchant_refund_no = fields.get("merchantRefundNo")
        refund_no = fields.get("refundNo")
        if isinstance(merchant_refund_no, str) and merchant_refund_no:
            refund = self._by_merchant_no.get(merchant_refund_no)
        elif isinstance(refund_no, str) and refund_no:
            refund = self._by_refund_no.get(refund_no)
        else:
            raise _param_error("merchantRefundNo or refundNo is required")
        if refund is None:
            raise _refuse("REFUND_NOT_FOUND", "refund not found")
        self._settle_if_due(refund)
        return _ok({**refund.data(), "status": refund.status})

    # ---- life cycle ----

    def _settle_if_due(self, refund: Pgv2Refund) -> None:
        # Settlement is evaluated when someone looks, against the current setting; once seen
        # SUCCESS it stays SUCCESS even if the delay is raised afterwards.
        delay = self.settle_after_seconds
        if (
            refund.status == PROCESSING
            and delay is not None
            and time.monotonic() - refund.created_monotonic >= delay
        ):
            self._set_status(refund, SUCCESS)

    def _set_status(self, refund: Pgv2Refund, status: str) -> None:
        refund.status = status
        self.sandbox.ledger.update_status(refund.ledger_entry, status, effective=status != FAILED)


def _text(fields: dict[str, Any], name: str, max_length: int) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise _param_error(f"{name} is required, at most {max_length} characters")
    return value
