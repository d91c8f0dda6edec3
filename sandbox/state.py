"""The sandbox's memory: payments, the ledger of what was really refunded, the call log.

Everything lives in one process, in memory, and is touched only from the event loop. Gateway
handlers read and mutate it without awaiting in between, so two concurrent requests can never
both pass a "not refunded yet" check: that is the whole concurrency story, and why handlers that
apply a refund are plain synchronous functions.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sandbox.config import SandboxConfig
from sandbox.faults import FaultBook

GATEWAYS: tuple[str, ...] = ("vai247", "bbmsl", "vaultspay", "pgv2")

# Per gateway: the status a new payment gets, and the statuses it may be given (None: any).
# vai247 and bbmsl have documented order statuses; vaultspay and pgv2 document none, so "ok"
# stands for "a successful payment" and anything else for "not refundable" (pgv2).
PAYMENT_STATUSES: dict[str, tuple[str, frozenset[str] | None]] = {
    "vai247": ("completed", frozenset({"pending", "processing", "completed", "cancelled"})),
    "bbmsl": ("SUCCESS", frozenset({"OPEN", "SUCCESS", "VOIDED", "REFUNDED", "CLOSED", "SETTLED"})),
    "vaultspay": ("ok", None),
    "pgv2": ("ok", None),
}
DEFAULT_CURRENCY: dict[str, str] = {
    "vai247": "HKD",
    "bbmsl": "HKD",
    "vaultspay": "AED",
    "pgv2": "INR",
}
# bbmsl order ids are numbers; start well away from 0 so an id is never mistaken for a count.
FIRST_BBMSL_ORDER_ID = 10001


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """ISO 8601 with milliseconds and a Z, the shape the gateways' examples use."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Payment:
    """An original payment a refund or cancel can be about."""

    gateway: str
    payment_ref: str
    amount: Decimal
    currency: str
    status: str
    created_at: datetime
    updated_at: datetime
    order_id: int | None = None  # bbmsl's numeric orderId
    refunded: Decimal = Decimal("0.00")  # sum of the ledger's effective refunds
    refund_count: int = 0  # refunds applied, effective or not

    @property
    def refundable(self) -> Decimal:
        return self.amount - self.refunded

    def view(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "gateway": self.gateway,
            "payment_ref": self.payment_ref,
            "amount": str(self.amount),
            "currency": self.currency,
            "status": self.status,
            "refunded_amount": str(self.refunded),
            "refundable_amount": str(self.refundable),
            "refund_count": self.refund_count,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }
        if self.gateway == "bbmsl":
            data["order_id"] = self.order_id
            data["net_amount"] = str(self.refundable)
        return data


class PaymentExists(Exception):
    """A payment with that reference already exists for the gateway."""


class PaymentBook:
    """Payments per gateway, by payment_ref; bbmsl orders also by numeric orderId."""

    def __init__(self) -> None:
        self._by_ref: dict[str, dict[str, Payment]] = {name: {} for name in GATEWAYS}
        self._bbmsl_by_order_id: dict[int, Payment] = {}
        self._order_ids = itertools.count(FIRST_BBMSL_ORDER_ID)

    def create(
        self,
        gateway: str,
        payment_ref: str,
        amount: Decimal,
        currency: str | None = None,
        status: str | None = None,
    ) -> Payment:
        """Register a payment; `ValueError` for a status the gateway does not have."""
        default_status, allowed = PAYMENT_STATUSES[gateway]
        status = status or default_status
        if allowed is not None and status not in allowed:
            raise ValueError(
                f"{gateway} payments have no status {status!r}; use one of {sorted(allowed)}"
            )
        book = self._by_ref[gateway]
        if payment_ref in book:
            raise PaymentExists(f"{gateway} payment {payment_ref!r} already exists")
        now = utc_now()
        payment = Payment(
            gateway=gateway,
            payment_ref=payment_ref,
            amount=amount,
            currency=currency or DEFAULT_CURRENCY[gateway],
            status=status,
            created_at=now,
            updated_at=now,
        )
        if gateway == "bbmsl":
            payment.order_id = next(self._order_ids)
            self._bbmsl_by_order_id[payment.order_id] = payment
        book[payment_ref] = payment
        return payment

    def get(self, gateway: str, payment_ref: str) -> Payment | None:
        return self._by_ref[gateway].get(payment_ref)

    def bbmsl_order(self, order_id: int) -> Payment | None:
        return self._bbmsl_by_order_id.get(order_id)

    def clear(self) -> None:
        for book in self._by_ref.values():
            book.clear()
        self._bbmsl_by_order_id.clear()
        self._order_ids = itertools.count(FIRST_BBMSL_ORDER_ID)


@dataclass
class LedgerEntry:
    """One refund or cancel the gateway applied. `effective` turns false when the gateway later
    says the money did not move after all (vaultspay 3/4, pgv2 FAILED): the entry stays, so a
    test still sees that the request was accepted."""

    id: int
    gateway: str
    kind: str  # "refund" | "cancel"
    payment: Payment = field(repr=False)
    amount: Decimal
    reference: str | None  # the gateway's id for the refund (None for a vai247 cancel)
    merchant_reference: str | None  # pgv2 merchantRefundNo
    at: datetime
    status: str | int  # the gateway's own status for it, as the gateway spells it
    effective: bool = True

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "gateway": self.gateway,
            "kind": self.kind,
            "payment_ref": self.payment.payment_ref,
            "amount": str(self.amount),
            "currency": self.payment.currency,
            "reference": self.reference,
            "merchant_reference": self.merchant_reference,
            "at": iso(self.at),
            "status": self.status,
            "effective": self.effective,
        }


class Ledger:
    """What the gateways really did, in order. The payment's refunded total is kept in step here
    and nowhere else, so the two cannot disagree."""

    def __init__(self) -> None:
        self._entries: list[LedgerEntry] = []

    def record(
        self,
        gateway: str,
        kind: str,
        payment: Payment,
        amount: Decimal,
        *,
        reference: str | None,
        status: str | int,
        merchant_reference: str | None = None,
    ) -> LedgerEntry:
        entry = LedgerEntry(
            id=len(self._entries) + 1,
            gateway=gateway,
            kind=kind,
            payment=payment,
            amount=amount,
            reference=reference,
            merchant_reference=merchant_reference,
            at=utc_now(),
            status=status,
        )
        self._entries.append(entry)
        if kind == "refund":
            payment.refunded += amount
            payment.refund_count += 1
        payment.updated_at = entry.at
        return entry

    def update_status(self, entry: LedgerEntry, status: str | int, *, effective: bool) -> None:
        """The gateway moved the refund on; its money counts only while it is effective."""
        if entry.kind == "refund" and effective != entry.effective:
            entry.payment.refunded += entry.amount if effective else -entry.amount
        entry.status = status
        entry.effective = effective
        entry.payment.updated_at = utc_now()

    def entries(
        self, gateway: str | None = None, payment_ref: str | None = None
    ) -> list[LedgerEntry]:
        return [
            entry
            for entry in self._entries
            if (gateway is None or entry.gateway == gateway)
            and (payment_ref is None or entry.payment.payment_ref == payment_ref)
        ]

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class CallRecord:
    """One request to a gateway endpoint (or one vaultspay callback the sandbox sent)."""

    id: int
    gateway: str
    endpoint: str
    at: datetime
    fault: str | None
    key: str | None
    payment_ref: str | None
    http_status: int | None  # None: no complete response was sent (drop, apply_then_drop)
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "gateway": self.gateway,
            "endpoint": self.endpoint,
            "at": iso(self.at),
            "fault": self.fault,
            "key": self.key,
            "payment_ref": self.payment_ref,
            "http_status": self.http_status,
            "error": self.error,
        }


class CallLog:
    def __init__(self) -> None:
        self._calls: list[CallRecord] = []

    def record(
        self,
        gateway: str,
        endpoint: str,
        *,
        at: datetime,
        fault: str | None,
        key: str | None,
        payment_ref: str | None,
        http_status: int | None,
        error: str | None = None,
    ) -> CallRecord:
        call = CallRecord(
            id=len(self._calls) + 1,
            gateway=gateway,
            endpoint=endpoint,
            at=at,
            fault=fault,
            key=key,
            payment_ref=payment_ref,
            http_status=http_status,
            error=error,
        )
        self._calls.append(call)
        return call

    def calls(
        self,
        gateway: str | None = None,
        endpoint: str | None = None,
        key: str | None = None,
        fault: str | None = None,
    ) -> list[CallRecord]:
        return [
            call
            for call in self._calls
            if (gateway is None or call.gateway == gateway)
            and (endpoint is None or call.endpoint == endpoint)
            and (key is None or call.key == key)
            and (fault is None or call.fault == fault)
        ]

    def clear(self) -> None:
        self._calls.clear()


class Sandbox:
    """Shared state of one sandbox app: configuration, payments, ledger, calls, faults, and the
    background tasks (vaultspay callbacks) it must not lose track of."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.payments = PaymentBook()
        self.ledger = Ledger()
        self.calls = CallLog()
        self.faults = FaultBook(config.fault_seed)
        self._reset_hooks: list[Callable[[bool], None]] = []
        # asyncio keeps only weak references to tasks; without this set a callback delivery
        # could be garbage-collected mid-flight.
        self._tasks: set[asyncio.Task[Any]] = set()

    def on_reset(self, hook: Callable[[bool], None]) -> None:
        """Register a gateway's own reset; it receives `restore_settings`."""
        self._reset_hooks.append(hook)

    def reset(self, *, restore_settings: bool = False) -> None:
        """Forget all data. Settings changed through the admin API survive unless
        `restore_settings`, which puts them back to the startup configuration."""
        self.payments.clear()
        self.ledger.clear()
        self.calls.clear()
        self.faults.clear()
        for hook in self._reset_hooks:
            hook(restore_settings)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a background coroutine on the current event loop and keep it referenced."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for background tasks (at shutdown)."""
        pending = list(self._tasks)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
