"""bbmsl: hosted-checkout refund and order query (seed 001; docs/inferred-contracts.md#bbmsl).

Every request is an envelope `{"request": "<JSON text>", "signature": "<base64>"}`; the signature
is SHA256withRSA (PKCS#1 v1.5) over the exact `request` text, verified with the merchant's public
key. Every answer is HTTP 200 with a `responseCode`. An order is refunded at most once, and only
while the merchant's unsettled balance covers the refund.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from sandbox import wire
from sandbox.dispatch import Inbound, Refusal, Reply, parse_json_body, serve_call
from sandbox.keys import load_rsa_public_key, verify_sha256_with_rsa
from sandbox.state import Payment, Sandbox

GATEWAY = "bbmsl"
REFUND_PATH = "/hosted-checkout/refund"
QUERY_PATH = "/hosted-checkout/query"
REFUNDABLE = frozenset({"SUCCESS", "SETTLED"})
MAX_REFERENCE_LENGTH = 64
MAX_INTEGER_DIGITS = 9
FIRST_TRANSACTION_ID = 50001


def _refuse(code: str, message: str) -> Refusal:
    # bbmsl answers refusals with HTTP 200 too; only responseCode tells them apart.
    return Refusal(Reply(200, {"responseCode": code, "message": message}))


def _invalid(message: str) -> Refusal:
    return _refuse("2001", f"Invalid request: {message}")


def _bbmsl_time(moment: datetime) -> str:
    # The seed shows "2022-06-21T13:13:10.000+00:00": milliseconds and a numeric offset.
    return moment.isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Envelope:
    """The outer body, and the inner request parsed (or why it could not be)."""

    request_text: str | None
    signature: str | None
    inner: Any
    inner_error: str | None


class Bbmsl:
    """The bbmsl simulator: one merchant (id, public key, unsettled balance)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        config = sandbox.config
        self.merchant_id = config.bbmsl_merchant_id
        self.public_key_pem: str | None = None
        self._public_key: rsa.RSAPublicKey | None = None
        self.set_public_key(config.bbmsl_public_key)
        self.unsettled_balance = config.bbmsl_unsettled_balance
        self._transaction_ids = itertools.count(FIRST_TRANSACTION_ID)
        sandbox.on_reset(self._reset)

    # ---- merchant administration ----

    def set_public_key(self, pem: str | None) -> None:
        """Install the merchant's public key (`ValueError` if it is not RSA); None removes it."""
        self._public_key = load_rsa_public_key(pem) if pem else None
        self.public_key_pem = pem or None

    def merchant_view(self) -> dict[str, Any]:
        return {
            "merchant_id": self.merchant_id,
            "has_public_key": self._public_key is not None,
            "unsettled_balance": str(self.unsettled_balance),
        }

    def _reset(self, restore_settings: bool) -> None:
        # The balance moves with every refund: it is data, not configuration.
        self.unsettled_balance = self.sandbox.config.bbmsl_unsettled_balance
        self._transaction_ids = itertools.count(FIRST_TRANSACTION_ID)
        if restore_settings:
            self.set_public_key(self.sandbox.config.bbmsl_public_key)

    # ---- the gateway ----

    def router(self) -> APIRouter:
        router = APIRouter(tags=["bbmsl"])

        async def refund(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="refund",
                identify=self._identify,
                apply=self._refund,
            )

        async def query(request: Request) -> Response:
            return await serve_call(
                request,
                sandbox=self.sandbox,
                gateway=GATEWAY,
                endpoint="query",
                identify=self._identify,
                apply=self._query,
            )

        router.add_api_route(REFUND_PATH, refund, methods=["POST"])
        router.add_api_route(QUERY_PATH, query, methods=["POST"])
        return router

    def _identify(self, raw: bytes) -> Inbound:
        outer, error = parse_json_body(raw)
        if not isinstance(outer, dict):
            envelope = Envelope(None, None, None, error or "body is not a JSON object")
            return Inbound(body=envelope)
        request_text = outer.get("request")
        signature = outer.get("signature")
        inner: Any = None
        inner_error: str | None = "request must be a string"
        if isinstance(request_text, str):
            inner, inner_error = parse_json_body(request_text.encode("utf-8"))
        envelope = Envelope(
            request_text if isinstance(request_text, str) else None,
            signature if isinstance(signature, str) else None,
            inner,
            inner_error,
        )
        # Calls are logged under the order's merchantReference even when addressed by orderId,
        # so one payment's calls are found under one key.
        key: str | None = None
        payment_ref: str | None = None
        if isinstance(inner, dict):
            order_id = inner.get("orderId")
            reference = inner.get("merchantReference")
            if isinstance(order_id, int) and not isinstance(order_id, bool):
                payment = self.sandbox.payments.bbmsl_order(order_id)
                payment_ref = payment.payment_ref if payment else None
                key = payment_ref or str(order_id)
            elif isinstance(reference, str):
                key = payment_ref = reference
        return Inbound(body=envelope, key=key, payment_ref=payment_ref)

    def _verified_request(self, inbound: Inbound) -> dict[str, Any]:
        """Signature, inner request and merchant: what both endpoints check first."""
        envelope = inbound.body
        assert isinstance(envelope, Envelope)
        if envelope.request_text is None:
            raise _invalid(envelope.inner_error or "request is required")
        if (
            self._public_key is None
            or envelope.signature is None
            or not verify_sha256_with_rsa(
                self._public_key, envelope.request_text, envelope.signature
            )
        ):
            raise _refuse("1001", "Invalid signature")
        inner = envelope.inner
        if not isinstance(inner, dict):
            raise _invalid(envelope.inner_error or "request must be a JSON object")
        merchant_id = inner.get("merchantId")
        # The seed's example sends merchantId as a number although the table says string.
        if isinstance(merchant_id, bool) or not isinstance(merchant_id, int | str):
            raise _invalid("merchantId is required")
        if str(merchant_id) != self.merchant_id:
            raise _refuse("1002", "Invalid merchant")
        return inner

    def _find_order(self, inner: dict[str, Any]) -> Payment:
        order_id = inner.get("orderId")
        reference = inner.get("merchantReference")
        if order_id is not None and (isinstance(order_id, bool) or not isinstance(order_id, int)):
            raise _invalid("orderId must be a number")
        if reference is not None and (
            not isinstance(reference, str) or not 0 < len(reference) <= MAX_REFERENCE_LENGTH
        ):
            raise _invalid(f"merchantReference must be a string of 1-{MAX_REFERENCE_LENGTH}")
        if order_id is not None:
            payment = self.sandbox.payments.bbmsl_order(order_id)
            # Both given but naming different orders: no such order.
            if payment is not None and reference is not None and payment.payment_ref != reference:
                payment = None
        elif reference is not None:
            payment = self.sandbox.payments.get(GATEWAY, reference)
        else:
            raise _invalid("orderId or merchantReference is required")
        if payment is None:
            raise _refuse("3001", "Order not found")
        return payment

    def _order_view(self, payment: Payment) -> dict[str, Any]:
        merchant_id: int | str = (
            int(self.merchant_id) if self.merchant_id.isdigit() else self.merchant_id
        )
        return {
            "id": payment.order_id,
            "merchantId": merchant_id,
            "merchantReference": payment.payment_ref,
            "currency": payment.currency,
            "amount": payment.amount,
            "netAmount": payment.amount - payment.refunded,
            "cardType": "VISA",
            "email": "",
            "createTime": _bbmsl_time(payment.created_at),
            "updateTime": _bbmsl_time(payment.updated_at),
            "status": payment.status,
            "recurring": False,
        }

    def _refund(self, request: Request, inbound: Inbound) -> Reply:
        inner = self._verified_request(inbound)
        amount = wire.json_number(inner.get("amount"))
        if amount is None:
            raise _invalid("amount is required and must be a number")
        if (
            amount <= 0
            or wire.decimal_places(amount) > 2
            or wire.integer_digits(amount) > MAX_INTEGER_DIGITS
        ):
            raise _invalid("amount must be positive, at most 9 digits with 2 decimals")
        payment = self._find_order(inner)
        if payment.status == "REFUNDED" or payment.refund_count:
            raise _refuse("3002", "Order already refunded")
        if payment.status not in REFUNDABLE:
            raise _refuse("3005", "Order not refundable")
        if amount > payment.amount:
            raise _refuse("3003", "Refund amount exceeds order amount")
        if amount > self.unsettled_balance:
            raise _refuse("3004", "Insufficient unsettled balance")
        self.unsettled_balance -= amount
        payment.status = "REFUNDED"
        transaction_id = next(self._transaction_ids)
        self.sandbox.ledger.record(
            GATEWAY, "refund", payment, amount, reference=str(transaction_id), status="SUCCESS"
        )
        order = self._order_view(payment)
        return Reply(
            200,
            {
                "responseCode": "0000",
                "message": "Success",
                "order": order,
                "transaction": {
                    "id": transaction_id,
                    "merchantId": order["merchantId"],
                    "type": "REFUND",
                    "amount": amount,
                    "currency": payment.currency,
                    "status": "SUCCESS",
                    "maskedPan": "400000XXXXXX0028",
                    "stan": f"S{transaction_id}",
                },
            },
        )

    def _query(self, request: Request, inbound: Inbound) -> Reply:
        payment = self._find_order(self._verified_request(inbound))
        return Reply(
            200, {"responseCode": "0000", "message": "Success", "order": self._order_view(payment)}
        )
