"""vai247: refund and cancel by order id (seeds 000, 004; GATEWAYS.md; docs/inferred-contracts.md).

What the gateway guarantees, and what that means for refundq:
* No idempotency key and no refund-status endpoint. A refund or cancel whose answer was lost
  (timeout, reset, 5xx, garbage) can neither be asked about nor sent again safely: the job
  becomes `unknown` (DESIGN.md rule 5) and waits for reconciliation or an operator.
* A refund is accepted as `"processing"` and settles in 3-5 business days with no way to observe
  it, so an accepted refund is final for us: `succeeded`, raw status `processing`.
* Cancel works only while the order is pending or processing; otherwise a definite refusal.
* Auth: `X-App-Id`, `X-Api-Key` and `X-Timestamp` (unix seconds). No request signature.
* Inferred (no page documents it): errors are non-2xx with `{"code", "message"}`; 4xx is a
  definite refusal, 401/403 our credentials (failed, not declined).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Generator
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr
from pydantic_settings import SettingsConfigDict

from providers.base import (
    Ambiguous,
    Capabilities,
    GatewayRequest,
    GatewayResult,
    GatewaySettings,
    InvalidForGateway,
    Kind,
    Outcome,
    Provider,
    json_bytes,
    parse_json_object,
    send,
)

ModelT = TypeVar("ModelT", bound=BaseModel)

REFUND_PATH = "/api/v1/payment-gateway/order/refund"
CANCEL_PATH = "/api/v1/payment-gateway/order/cancel"


class Vai247Settings(GatewaySettings):
    model_config = SettingsConfigDict(env_prefix="REFUNDQ_VAI247_")

    base_url: str
    app_id: str
    api_key: SecretStr


class Vai247Status(enum.StrEnum):
    PROCESSING = "processing"  # refund accepted; settles in 3-5 business days, unobservable
    CANCELLED = "cancelled"


# Every status the gateway can answer with, mapped to ours. Anything not listed is not a success.
STATUS_MAP: dict[str, Outcome] = {
    Vai247Status.PROCESSING: Outcome.SUCCEEDED,
    Vai247Status.CANCELLED: Outcome.SUCCEEDED,
}


class Vai247RefundRequest(BaseModel):
    order_id: str
    amount: Decimal
    reason: str | None = None


class Vai247CancelRequest(BaseModel):
    order_id: str
    reason: str | None = None


class Vai247RefundResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    refund_id: str
    order_id: str
    amount: Decimal
    status: str
    created_at: str


class Vai247CancelResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    order_id: str
    status: str
    cancelled_at: str


class Vai247Error(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str | None = None
    message: str | None = None


class Vai247Auth(httpx.Auth):
    """The three documented headers; the timestamp is taken when the request is built."""

    def __init__(self, settings: Vai247Settings) -> None:
        self._settings = settings

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["X-App-Id"] = self._settings.app_id
        request.headers["X-Api-Key"] = self._settings.api_key.get_secret_value()
        request.headers["X-Timestamp"] = str(int(time.time()))
        yield request


class Vai247Provider(Provider):
    name = "vai247"
    capabilities = Capabilities(
        kinds=frozenset({Kind.REFUND, Kind.CANCEL}),
        status_query=False,
        resend_safe=False,
        max_attempts=6,
    )
    settings_class = Vai247Settings
    extra_fields: ClassVar[dict[str, str]] = {}

    settings: Vai247Settings

    def __init__(self, settings: Vai247Settings, client: httpx.Client) -> None:
        super().__init__(settings, client)
        self._auth = Vai247Auth(settings)

    @classmethod
    def validate_request(cls, request: GatewayRequest) -> None:
        if request.kind is Kind.REFUND and request.amount is not None:
            # The gateway takes a JSON number; more than 2 decimals is refused there (inferred).
            exponent = request.amount.as_tuple().exponent
            if isinstance(exponent, int) and exponent < -2:
                raise InvalidForGateway("vai247 amounts carry at most 2 decimals")

    def refund(self, request: GatewayRequest) -> GatewayResult:
        assert request.amount is not None, "a refund always has an amount"
        body = Vai247RefundRequest(
            order_id=request.payment_ref, amount=request.amount, reason=request.reason
        )
        response = self._post(REFUND_PATH, body.model_dump(exclude_none=True))
        if response.is_success:
            parsed = _parse(Vai247RefundResponse, response)
            return self._accepted(parsed.status, parsed.refund_id, response.status_code)
        return self._refusal(response)

    def cancel(self, request: GatewayRequest) -> GatewayResult:
        body = Vai247CancelRequest(order_id=request.payment_ref, reason=request.reason)
        response = self._post(CANCEL_PATH, body.model_dump(exclude_none=True))
        if response.is_success:
            parsed = _parse(Vai247CancelResponse, response)
            return self._accepted(parsed.status, None, response.status_code)
        return self._refusal(response)

    def _post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        request = self.client.build_request(
            "POST",
            self.settings.base_url.rstrip("/") + path,
            content=json_bytes(payload),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        return send(self.client, request, auth=self._auth)

    @staticmethod
    def _accepted(raw_status: str, reference: str | None, http_status: int) -> GatewayResult:
        outcome = STATUS_MAP.get(raw_status)
        if outcome is None:
            # A 2xx with a status we do not know: the gateway did *something*; never call it a
            # success or a refusal on a guess.
            raise Ambiguous(
                f"vai247 answered {http_status} with unknown status {raw_status!r}",
                code="UNKNOWN_STATUS",
                http_status=http_status,
            )
        return GatewayResult(
            outcome=outcome,
            provider_reference=reference,
            raw_status=raw_status,
            http_status=http_status,
        )

    @staticmethod
    def _refusal(response: httpx.Response) -> GatewayResult:
        error = Vai247Error.model_validate(parse_json_object(response))
        code = error.code or f"HTTP_{response.status_code}"
        message = error.message or response.reason_phrase
        # 401/403: the gateway refused *us* (credentials, IP allow-list), not the refund.
        outcome = Outcome.FAILED if response.status_code in (401, 403) else Outcome.DECLINED
        return GatewayResult(
            outcome=outcome, code=code, message=message, http_status=response.status_code
        )


def _parse(model: type[ModelT], response: httpx.Response) -> ModelT:
    """A 2xx body in the documented shape, or `Ambiguous` (the refund may well have happened)."""
    body = parse_json_object(response)
    try:
        return model.model_validate(body)
    except ValueError as exc:
        raise Ambiguous(
            f"vai247 answered {response.status_code} with an unexpected body: {exc}",
            code="MALFORMED_RESPONSE",
            http_status=response.status_code,
        ) from exc
