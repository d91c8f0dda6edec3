"""The admin API under `/_admin`: set up payments, read the ledger and call log, inject faults,
drive life cycles. No auth: the sandbox is a test tool bound to loopback. The contract is in
`sandbox/README.md`; other test suites code against it, so change it only additively."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any, Literal, Self

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sandbox.bbmsl import Bbmsl
from sandbox.config import DuplicateMode
from sandbox.faults import FaultSpec
from sandbox.pgv2 import Pgv2
from sandbox.state import GATEWAYS, PaymentExists, Sandbox
from sandbox.vaultspay import AutoAdvance, Vaultspay


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResetIn(_Strict):
    restore_settings: bool = False


class PaymentIn(_Strict):
    payment_ref: str = Field(min_length=1)
    amount: Decimal = Field(gt=0, allow_inf_nan=False, decimal_places=2)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    status: str | None = None


class MerchantIn(_Strict):
    public_key_pem: str | None = None
    unsettled_balance: Decimal | None = Field(default=None, ge=0, allow_inf_nan=False)


class VaultspayStatusIn(_Strict):
    status: int = Field(ge=0, le=4)


class AutoAdvanceIn(_Strict):
    initiated_after_seconds: float | None = Field(default=None, ge=0)
    final_after_seconds: float = Field(ge=0)
    final_status: Literal[2, 3, 4] = 2

    @model_validator(mode="after")
    def _initiated_before_final(self) -> Self:
        initiated = self.initiated_after_seconds
        if initiated is not None and initiated > self.final_after_seconds:
            raise ValueError("initiated_after_seconds must not exceed final_after_seconds")
        return self


class VaultspaySettingsIn(_Strict):
    token_ttl_seconds: int | None = Field(default=None, ge=0)
    auto_advance: AutoAdvanceIn | None = None  # explicit null switches auto-advance off


class Pgv2StatusIn(_Strict):
    status: Literal["SUCCESS", "FAILED"]


class Pgv2SettingsIn(_Strict):
    duplicate_mode: DuplicateMode | None = None
    settle_after_seconds: float | None = Field(default=None, ge=0)  # explicit null: never


def _not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} not found")


class AdminApi:
    """The admin endpoints over one sandbox's state and its gateways."""

    def __init__(self, sandbox: Sandbox, *, bbmsl: Bbmsl, vaultspay: Vaultspay, pgv2: Pgv2):
        self.sandbox = sandbox
        self.bbmsl = bbmsl
        self.vaultspay = vaultspay
        self.pgv2 = pgv2

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/_admin", tags=["admin"])
        created = status.HTTP_201_CREATED
        routes: list[tuple[str, str, Any, int]] = [
            ("POST", "/reset", self.reset, 200),
            ("GET", "/ledger", self.ledger, 200),
            ("GET", "/calls", self.calls, 200),
            ("POST", "/faults", self.add_fault, created),
            ("GET", "/faults", self.list_faults, 200),
            ("DELETE", "/faults", self.delete_faults, 200),
            ("DELETE", "/faults/{rule_id}", self.delete_fault, 200),
            ("GET", "/bbmsl/merchant", self.get_merchant, 200),
            ("POST", "/bbmsl/merchant", self.update_merchant, 200),
            ("GET", "/vaultspay/refund-requests/{refund_uuid}", self.get_refund_request, 200),
            (
                "POST",
                "/vaultspay/refund-requests/{refund_uuid}/status",
                self.set_refund_request_status,
                200,
            ),
            (
                "POST",
                "/vaultspay/refund-requests/{refund_uuid}/callback",
                self.redeliver_callback,
                200,
            ),
            ("POST", "/vaultspay/tokens/expire", self.expire_tokens, 200),
            ("GET", "/vaultspay/settings", self.get_vaultspay_settings, 200),
            ("POST", "/vaultspay/settings", self.update_vaultspay_settings, 200),
            ("GET", "/pgv2/refunds/{merchant_refund_no}", self.get_pgv2_refund, 200),
            (
                "POST",
                "/pgv2/refunds/{merchant_refund_no}/status",
                self.set_pgv2_refund_status,
                200,
            ),
            ("GET", "/pgv2/settings", self.get_pgv2_settings, 200),
            ("POST", "/pgv2/settings", self.update_pgv2_settings, 200),
            ("POST", "/{gateway}/payments", self.create_payment, created),
            ("GET", "/{gateway}/payments/{payment_ref}", self.get_payment, 200),
        ]
        for method, path, endpoint, status_code in routes:
            router.add_api_route(path, endpoint, methods=[method], status_code=status_code)
        return router

    def _bring_up_to_date(self) -> None:
        # Settlement and auto-advance are partly lazy; make them visible before any read.
        self.pgv2.settle_all_due()
        self.vaultspay.catch_up_all()

    # ---- data ----

    async def reset(self, body: ResetIn | None = None) -> dict[str, Any]:
        restore = body.restore_settings if body else False
        self.sandbox.reset(restore_settings=restore)
        return {"reset": True, "restored_settings": restore}

    async def create_payment(self, gateway: str, body: PaymentIn) -> dict[str, Any]:
        _check_gateway(gateway)
        try:
            payment = self.sandbox.payments.create(
                gateway, body.payment_ref, body.amount, body.currency, body.status
            )
        except PaymentExists as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
        return payment.view()

    async def get_payment(self, gateway: str, payment_ref: str) -> dict[str, Any]:
        _check_gateway(gateway)
        self._bring_up_to_date()
        payment = self.sandbox.payments.get(gateway, payment_ref)
        if payment is None:
            raise _not_found(f"{gateway} payment {payment_ref!r}")
        return payment.view()

    async def ledger(
        self, gateway: str | None = None, payment_ref: str | None = None
    ) -> dict[str, Any]:
        self._bring_up_to_date()
        entries = [entry.view() for entry in self.sandbox.ledger.entries(gateway, payment_ref)]
        return {"entries": entries, "count": len(entries)}

    async def calls(
        self,
        gateway: str | None = None,
        endpoint: str | None = None,
        key: str | None = None,
        fault: str | None = None,
    ) -> dict[str, Any]:
        found = [call.view() for call in self.sandbox.calls.calls(gateway, endpoint, key, fault)]
        return {"calls": found, "count": len(found)}

    # ---- faults ----

    async def add_fault(self, spec: FaultSpec) -> dict[str, Any]:
        return self.sandbox.faults.add(spec).view(time.monotonic())

    async def list_faults(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"faults": [rule.view(now) for rule in self.sandbox.faults.rules()]}

    async def delete_faults(self) -> dict[str, Any]:
        count = len(self.sandbox.faults.rules())
        self.sandbox.faults.clear()
        return {"deleted": count}

    async def delete_fault(self, rule_id: str) -> dict[str, Any]:
        if not self.sandbox.faults.remove(rule_id):
            raise _not_found(f"fault {rule_id}")
        return {"deleted": 1}

    # ---- bbmsl ----

    async def get_merchant(self) -> dict[str, Any]:
        return self.bbmsl.merchant_view()

    async def update_merchant(self, body: MerchantIn) -> dict[str, Any]:
        if "public_key_pem" in body.model_fields_set:
            try:
                self.bbmsl.set_public_key(body.public_key_pem)
            except ValueError as exc:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"public_key_pem: {exc}"
                ) from exc
        if body.unsettled_balance is not None:
            self.bbmsl.unsettled_balance = body.unsettled_balance
        return self.bbmsl.merchant_view()

    # ---- vaultspay ----

    async def get_refund_request(self, refund_uuid: str) -> dict[str, Any]:
        view = self.vaultspay.request_view(refund_uuid)
        if view is None:
            raise _not_found(f"refund request {refund_uuid!r}")
        return view

    async def set_refund_request_status(
        self, refund_uuid: str, body: VaultspayStatusIn
    ) -> dict[str, Any]:
        if not self.vaultspay.set_status(refund_uuid, body.status):
            raise _not_found(f"refund request {refund_uuid!r}")
        return await self.get_refund_request(refund_uuid)

    async def redeliver_callback(self, refund_uuid: str) -> dict[str, Any]:
        if self.vaultspay.request_view(refund_uuid) is None:
            raise _not_found(f"refund request {refund_uuid!r}")
        problem = self.vaultspay.redeliver_callback(refund_uuid)
        if problem is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=problem)
        return {"scheduled": True}

    async def expire_tokens(self) -> dict[str, Any]:
        return {"expired": self.vaultspay.expire_tokens()}

    async def get_vaultspay_settings(self) -> dict[str, Any]:
        return self.vaultspay.settings_view()

    async def update_vaultspay_settings(self, body: VaultspaySettingsIn) -> dict[str, Any]:
        if body.token_ttl_seconds is not None:
            self.vaultspay.token_ttl_seconds = body.token_ttl_seconds
        if "auto_advance" in body.model_fields_set:
            plan = body.auto_advance
            self.vaultspay.auto_advance = (
                None
                if plan is None
                else AutoAdvance(
                    final_after_seconds=plan.final_after_seconds,
                    final_status=plan.final_status,
                    initiated_after_seconds=plan.initiated_after_seconds,
                )
            )
        return self.vaultspay.settings_view()

    # ---- pgv2 ----

    async def get_pgv2_refund(self, merchant_refund_no: str) -> dict[str, Any]:
        view = self.pgv2.refund_view(merchant_refund_no)
        if view is None:
            raise _not_found(f"pgv2 refund {merchant_refund_no!r}")
        return view

    async def set_pgv2_refund_status(
        self, merchant_refund_no: str, body: Pgv2StatusIn
    ) -> dict[str, Any]:
        if not self.pgv2.set_status(merchant_refund_no, body.status):
            raise _not_found(f"pgv2 refund {merchant_refund_no!r}")
        return await self.get_pgv2_refund(merchant_refund_no)

    async def get_pgv2_settings(self) -> dict[str, Any]:
        return self.pgv2.settings_view()

    async def update_pgv2_settings(self, body: Pgv2SettingsIn) -> dict[str, Any]:
        if body.duplicate_mode is not None:
            self.pgv2.duplicate_mode = body.duplicate_mode
        if "settle_after_seconds" in body.model_fields_set:
            self.pgv2.settle_after_seconds = body.settle_after_seconds
        return self.pgv2.settings_view()


def _check_gateway(gateway: str) -> None:
    if gateway not in GATEWAYS:
        raise _not_found(f"gateway {gateway!r}")
