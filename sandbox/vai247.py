"""vai247: refund and cancel by order id (seeds 000, 004; docs/inferred-contracts.md#vai247).

Auth is three static headers, no signature. Errors are non-2xx JSON `{code, message}`. There is
no idempotency key and no status query: a repeated refund request is a new refund, which is
exactly what the ledger must show when a client resends blindly.
"""

from __future__ import annotations

import hmac
import secrets
import time
from decimal import Decimal

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from sandbox import wire
from sandbox.dispatch import Inbound, Refusal, Reply, parse_json_body, serve_call
from sandbox.state import Payment, Sandbox, iso

GATEWAY = "vai247"
REFUND_PATH = "/api/v1/payment-gateway/order/refund"
CANCEL_PATH = "/api/v1/payment-gateway/order/cancel"
CANCELLABLE = frozenset({"pending", "processing"})


def _refuse(status: int, code: str, message: str) -> Refusal:
    return Refusal(Reply(status, {"code": code, "message": message}))


def _invalid(message: str) -> Refusal:
    return _refuse(400, "INVALID_REQUEST", message)


class Vai247:
    """The vai247 simulator: its router and its rules."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        config = sandbox.config
        self._app_id = config.vai247_app_id.encode()
        self._api_key = config.vai247_api_key.get_secret_value().encode()
        self._skew = config.vai247_timestamp_skew_seconds

    def router(self) -> APIRouter:
        router = APIRouter(tags=["vai247"])

        async def refund(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="refund",
                identify=self._identify,
                apply=self._refund,
            )

        async def cancel(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="cancel",
                identify=self._identify,
                apply=self._cancel,
            )

        router.add_api_route(REFUND_PATH, refund, methods=["POST"])
        router.add_api_route(CANCEL_PATH, cancel, methods=["POST"])
        return router

    @staticmethod
    def _identify(raw: bytes) -> Inbound:
        body, error = parse_json_body(raw)
        order_id = body.get("order_id") if isinstance(body, dict) else None
        ref = order_id if isinstance(order_id, str) else None
        return Inbound(body=body, error=error, key=ref, payment_ref=ref)

    def _authenticate(self, request: Request) -> None:
        headers = request.headers
        app_id = headers.get("x-app-id", "").encode()
        api_key = headers.get("x-api-key", "").encode()
        # Both compared in constant time and both always compared, so the answer's timing does
        # not tell which one was wrong.
        app_ok = hmac.compare_digest(app_id, self._app_id)
        key_ok = hmac.compare_digest(api_key, self._api_key)
        if not (app_ok and key_ok):
            raise _refuse(401, "UNAUTHORIZED", "Invalid X-App-Id or X-Api-Key")
        timestamp = headers.get("x-timestamp", "")
        if not timestamp.isdigit():
            raise _refuse(401, "UNAUTHORIZED", "X-Timestamp must be unix seconds")
        if abs(time.time() - int(timestamp)) > self._skew:
            raise _refuse(401, "UNAUTHORIZED", f"X-Timestamp is more than {self._skew:g} s off")

    def _order_request(
        self, request: Request, inbound: Inbound, *, with_amount: bool
    ) -> tuple[Payment, Decimal]:
        """Auth, the request's fields, and the order it names. The amount is zero for a cancel,
        which sends none."""
        self._authenticate(request)
        body = inbound.body
        if not isinstance(body, dict):
            raise _invalid(f"Body must be a JSON object ({inbound.error or 'not an object'})")
        order_id = body.get("order_id")
        if not isinstance(order_id, str) or not order_id:
            raise _invalid("order_id is required and must be a string")
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise _invalid("reason must be a string")
        amount = Decimal(0)
        if with_amount:
            parsed = wire.json_number(body.get("amount"))
            if parsed is None:
                raise _invalid("amount is required and must be a number")
            if parsed <= 0 or wire.decimal_places(parsed) > 2:
                raise _invalid("amount must be positive with at most 2 decimals")
            amount = parsed
        payment = self.sandbox.payments.get(GATEWAY, order_id)
        if payment is None:
            raise _refuse(404, "ORDER_NOT_FOUND", f"Order {order_id} not found")
        return payment, amount

    def _refund(self, request: Request, inbound: Inbound) -> Reply:
        payment, amount = self._order_request(request, inbound, with_amount=True)
        order_id = payment.payment_ref
        if payment.status != "completed":
            raise _refuse(
                409,
                "ORDER_NOT_REFUNDABLE",
                f"Order {order_id} is {payment.status}; only completed orders can be refunded",
            )
        # "must be ≤ original amount" read cumulatively: earlier refunds count.
        if amount > payment.refundable:
            raise _refuse(
                422,
                "AMOUNT_EXCEEDS_ORIGINAL",
                f"Refund of {amount} exceeds the refundable {payment.refundable} "
                f"of order {order_id} (original {payment.amount})",
            )
        refund_id = f"ref_{secrets.token_hex(12)}"
        entry = self.sandbox.ledger.record(
            GATEWAY, "refund", payment, amount, reference=refund_id, status="processing"
        )
        return Reply(
            200,
            {
                "refund_id": refund_id,
                "order_id": order_id,
                "amount": amount,
                "status": "processing",
                "created_at": iso(entry.at),
            },
        )

    def _cancel(self, request: Request, inbound: Inbound) -> Reply:
        payment, _ = self._order_request(request, inbound, with_amount=False)
        order_id = payment.payment_ref
        if payment.status == "cancelled":
            raise _refuse(409, "ORDER_NOT_CANCELLABLE", f"Order {order_id} is already cancelled")
        if payment.status not in CANCELLABLE:
            raise _refuse(
                409,
                "ORDER_NOT_CANCELLABLE",
                "Only pending or processing orders can be cancelled; "
                "completed orders must be refunded",
            )
        payment.status = "cancelled"
        # A cancel voids the whole order; the ledger records its amount, but it is not a refund,
        # so the payment's refunded total does not move.
        entry = self.sandbox.ledger.record(
            GATEWAY, "cancel", payment, payment.amount, reference=None, status="cancelled"
        )
        return Reply(
            200, {"order_id": order_id, "status": "cancelled", "cancelled_at": iso(entry.at)}
        )
