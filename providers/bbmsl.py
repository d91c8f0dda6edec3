"""bbmsl: hosted-checkout refund and order query, RSA-signed (seed 001; GATEWAYS.md;
docs/inferred-contracts.md).

What the gateway guarantees, and what that means for refundq:
* An order is refunded **at most once** (full or partial). A resend of the same refund for the same
  order therefore cannot refund twice (`resend_safe`), and a second job for the same payment is
  refused at enqueue (`single_refund_per_payment`).
* `POST /hosted-checkout/query` finds the order by *our* identifier (merchantReference, or the
  orderId extra), so an ambiguous refund is settled by asking it: `REFUNDED` by exactly our amount
  (`amount - netAmount`) -> it happened; `SUCCESS`/`SETTLED`/`OPEN` -> it did not.
* Every request is the envelope `{"request": "<JSON string>", "signature": "<base64>"}`, signed
  SHA256withRSA (PKCS#1 v1.5) over the UTF-8 bytes of exactly the `request` string sent.

Decisions and inferred parts (change them here, in the sandbox router and in the docs together):
* `merchantId` is sent as a JSON **number**. The parameter table says "string", but the seed's
  signed example sends `"merchantId":3` and every response types it as a number, so the number is
  what the gateway demonstrably accepts. `BbmslSettings.merchant_id` is therefore an int.
* `amount` is a JSON number with exactly two decimals (`10.00`), never through float.
* Responses are not signed (nothing documents it); every answer is HTTP 200 with `responseCode`.
  "1001"/"1002" are our configuration (failed); "2001" and "3001"-"3005" are refusals (declined);
  any other code is not understood and therefore ambiguous, never a refusal on a guess.
* A refund answer is trusted only when it is a `REFUND` transaction whose status we know: SUCCESS
  or SETTLED -> succeeded, DECLINED -> declined; any other status is ambiguous (the query decides).
* Query outcomes for the order's status: REFUNDED by our amount -> succeeded; REFUNDED by another
  amount -> unresolved (someone else refunded it; a human looks). VOIDED and CLOSED -> unresolved
  too: a void also returns the money and may well have been what a refund before settlement
  became, so neither proves our refund did *not* happen, and calling it "declined" could invite a
  second refund through another channel. Query errors about our credentials raise `NotSent`:
  they say nothing about the refund.
"""

from __future__ import annotations

import base64
import enum
import re
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import SettingsConfigDict

from providers.base import (
    Ambiguous,
    Capabilities,
    GatewayRequest,
    GatewayResult,
    GatewaySettings,
    InvalidForGateway,
    Kind,
    NotSent,
    Outcome,
    Provider,
    json_bytes,
    parse_json_object,
    send,
)
from providers.config import FILE_PREFERRED

ModelT = TypeVar("ModelT", bound=BaseModel)

REFUND_PATH = "/hosted-checkout/refund"
QUERY_PATH = "/hosted-checkout/query"
SUCCESS_CODE = "0000"
KEY_VARIABLE = "REFUNDQ_BBMSL_PRIVATE_KEY_FILE"
MAX_REFERENCE_LENGTH = 64
MAX_INTEGER_DIGITS = 9
CENT = Decimal("0.01")
_ORDER_ID = re.compile(r"[1-9][0-9]{0,17}")


def load_private_key(pem: SecretStr) -> rsa.RSAPrivateKey:
    """The merchant's RSA private key from PEM text (PKCS#8; PKCS#1 loads too). The error never
    carries key material, only what the operator has to fix."""
    try:
        key = serialization.load_pem_private_key(
            pem.get_secret_value().encode("utf-8"), password=None
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # cryptography's messages describe the format, never the data; keep them for operators.
        raise ValueError(
            f"{KEY_VARIABLE} must name a file holding an unencrypted PEM private key "
            f"(PKCS#8): {exc}"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            f"{KEY_VARIABLE} holds a {type(key).__name__}; bbmsl signs with RSA (SHA256withRSA)"
        )
    return key


def sign_request(key: rsa.RSAPrivateKey, request_text: str) -> str:
    """SHA256withRSA (PKCS#1 v1.5) over the UTF-8 bytes of `request_text`, base64."""
    signature = key.sign(request_text.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


class BbmslSettings(GatewaySettings):
    model_config = SettingsConfigDict(
        env_prefix="REFUNDQ_BBMSL_",
        env_file=".env",
        extra="ignore",
        # pydantic otherwise prints every input (the PEM key included) in a ValidationError.
        hide_input_in_errors=True,
    )

    base_url: str
    merchant_id: int = Field(gt=0)  # a JSON number on the wire: see the module docstring
    # Operators give the PEM as a file (REFUNDQ_BBMSL_PRIVATE_KEY_FILE); a missing key is reported
    # under that name.
    private_key: SecretStr = Field(json_schema_extra={FILE_PREFERRED: True})

    @field_validator("private_key")
    @classmethod
    def _holds_an_rsa_private_key(cls, value: SecretStr) -> SecretStr:
        # Fail when settings load (the provider is then "not configured"), not on the first job.
        load_private_key(value)
        return value


class BbmslOrderStatus(enum.StrEnum):
    OPEN = "OPEN"
    SUCCESS = "SUCCESS"
    VOIDED = "VOIDED"
    REFUNDED = "REFUNDED"
    CLOSED = "CLOSED"
    SETTLED = "SETTLED"


class BbmslTransactionStatus(enum.StrEnum):
    SUCCESS = "SUCCESS"
    DECLINED = "DECLINED"
    VOIDED = "VOIDED"
    REFUNDED = "REFUNDED"
    SETTLED = "SETTLED"


# The refund transaction's status in a "0000" refund answer. Anything not listed is ambiguous:
# VOIDED/REFUNDED make no sense for a refund transaction, and the order query will tell.
STATUS_MAP: dict[str, Outcome] = {
    BbmslTransactionStatus.SUCCESS: Outcome.SUCCEEDED,
    BbmslTransactionStatus.SETTLED: Outcome.SUCCEEDED,
    BbmslTransactionStatus.DECLINED: Outcome.DECLINED,
}

# The order's status in a query answer. REFUNDED is succeeded only when the refunded amount is
# ours (checked in `_order_result`); anything not listed is ambiguous.
ORDER_STATUS_MAP: dict[str, Outcome] = {
    BbmslOrderStatus.REFUNDED: Outcome.SUCCEEDED,
    BbmslOrderStatus.SUCCESS: Outcome.NOT_FOUND,  # paid, not refunded: ours never happened
    BbmslOrderStatus.SETTLED: Outcome.NOT_FOUND,
    BbmslOrderStatus.OPEN: Outcome.NOT_FOUND,
    BbmslOrderStatus.VOIDED: Outcome.UNRESOLVED,  # money returned, maybe not by us
    BbmslOrderStatus.CLOSED: Outcome.UNRESOLVED,
}

# Non-success responseCode values (docs/inferred-contracts.md). Not listed -> ambiguous.
RESPONSE_CODE_MAP: dict[str, Outcome] = {
    "1001": Outcome.FAILED,  # Invalid signature: the key BBMSL holds is not ours
    "1002": Outcome.FAILED,  # Invalid merchant: REFUNDQ_BBMSL_MERCHANT_ID
    "2001": Outcome.DECLINED,  # Invalid request
    "3001": Outcome.DECLINED,  # Order not found
    "3002": Outcome.DECLINED,  # Order already refunded
    "3003": Outcome.DECLINED,  # Refund amount exceeds order amount
    "3004": Outcome.DECLINED,  # Insufficient unsettled balance
    "3005": Outcome.DECLINED,  # Order not refundable
}

# On a query only these refusals can happen; the first two are about us, not about the refund.
QUERY_REFUSED_CODES = frozenset({"1001", "1002"})
QUERY_DECLINE_CODES = frozenset({"2001", "3001"})


class _Wire(BaseModel):
    """bbmsl's camelCase names on snake_case fields; unknown response fields are kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class BbmslRefundRequest(_Wire):
    model_config = ConfigDict(extra="forbid")

    merchant_id: int
    order_id: int | None = None
    merchant_reference: str | None = None
    amount: Decimal


class BbmslQueryRequest(_Wire):
    model_config = ConfigDict(extra="forbid")

    merchant_id: int
    order_id: int | None = None
    merchant_reference: str | None = None


class BbmslEnvelope(BaseModel):
    """What goes on the wire: the inner request as a JSON string, and its signature."""

    request: str
    signature: str


# Strict on the fields we act on, lenient (optional) on what we only record: a missing email
# must not make a refund that happened look ambiguous.
class BbmslOrder(_Wire):
    id: int
    merchant_id: int | None = None
    merchant_reference: str | None = None
    currency: str | None = None
    amount: Decimal
    net_amount: Decimal
    card_type: str | None = None
    email: str | None = None
    create_time: str | None = None
    update_time: str | None = None
    status: str
    recurring: bool | None = None


class BbmslTransaction(_Wire):
    id: int
    merchant_id: int | None = None
    type: str
    amount: Decimal
    currency: str | None = None
    status: str
    masked_pan: str | None = None
    stan: str | None = None


class BbmslRefundResponse(_Wire):
    response_code: str
    message: str | None = None  # "Required" in the table, absent from the seed's own example
    order: BbmslOrder
    transaction: BbmslTransaction


class BbmslQueryResponse(_Wire):
    response_code: str
    message: str | None = None
    order: BbmslOrder


class BbmslErrorResponse(_Wire):
    response_code: str
    message: str | None = None


def _order_identifier(request: GatewayRequest) -> tuple[int | None, str | None]:
    """(orderId, merchantReference): the `order_id` extra wins; otherwise our payment_ref."""
    order_id = request.extras.get("order_id")
    if order_id is not None:
        return int(order_id), None
    return None, request.payment_ref


def _integer_digits(amount: Decimal) -> int:
    return len(str(abs(int(amount))))


class BbmslProvider(Provider):
    name = "bbmsl"
    capabilities = Capabilities(
        kinds=frozenset({Kind.REFUND}),
        status_query=True,
        status_by_own_reference=True,
        resend_safe=True,
        single_refund_per_payment=True,
    )
    settings_class = BbmslSettings
    extra_fields: ClassVar[dict[str, str]] = {
        "order_id": "BBMSL orderId (a number): identifies the order instead of sending "
        "payment_ref as merchantReference",
    }

    settings: BbmslSettings

    def __init__(self, settings: BbmslSettings, client: httpx.Client) -> None:
        super().__init__(settings, client)
        # Parsing a PEM key costs more than signing with it: once per provider instance.
        self._key = load_private_key(settings.private_key)

    @classmethod
    def validate_request(cls, request: GatewayRequest) -> None:
        if request.kind is not Kind.REFUND:
            raise InvalidForGateway("bbmsl has no cancel; refund the order instead")
        order_id = request.extras.get("order_id")
        if order_id is not None:
            if not _ORDER_ID.fullmatch(order_id):
                raise InvalidForGateway(
                    f"bbmsl order_id must be a positive whole number, got {order_id!r}"
                )
        elif not 1 <= len(request.payment_ref) <= MAX_REFERENCE_LENGTH:
            raise InvalidForGateway(
                f"bbmsl merchantReference (payment_ref) must be 1-{MAX_REFERENCE_LENGTH} "
                f"characters, got {len(request.payment_ref)}"
            )
        amount = request.amount
        if amount is None:
            raise InvalidForGateway("a bbmsl refund needs an amount")
        exponent = amount.as_tuple().exponent
        if not isinstance(exponent, int) or exponent < -2:
            raise InvalidForGateway("bbmsl amounts carry at most 2 decimals")
        if _integer_digits(amount) > MAX_INTEGER_DIGITS:
            raise InvalidForGateway(
                f"bbmsl amounts have at most {MAX_INTEGER_DIGITS} integer digits"
            )

    def refund(self, request: GatewayRequest) -> GatewayResult:
        assert request.amount is not None, "a refund always has an amount"
        amount = request.amount.quantize(CENT)
        order_id, merchant_reference = _order_identifier(request)
        inner = BbmslRefundRequest(
            merchant_id=self.settings.merchant_id,
            order_id=order_id,
            merchant_reference=merchant_reference,
            amount=amount,
        )
        response = self._post(REFUND_PATH, inner)
        body = _answer_body(response)
        if body is None:
            return GatewayResult(
                outcome=Outcome.FAILED,
                code=f"HTTP_{response.status_code}",
                message=_http_refusal(response),
                http_status=response.status_code,
            )
        code = _response_code(body, response)
        if code == SUCCESS_CODE:
            parsed = _parse(BbmslRefundResponse, body, response)
            return _refund_result(parsed, amount, response.status_code)
        error = _parse(BbmslErrorResponse, body, response)
        outcome = RESPONSE_CODE_MAP.get(code)
        if outcome is None:
            raise Ambiguous(
                f"bbmsl answered the refund with unknown responseCode {code!r}: {error.message}",
                code=code,
                http_status=response.status_code,
            )
        return GatewayResult(
            outcome=outcome,
            code=code,
            message=_with_hint(code, error.message),
            http_status=response.status_code,
        )

    def status(self, request: GatewayRequest) -> GatewayResult:
        """Query the order by our identifier. Errors are about the query, never the refund."""
        order_id, merchant_reference = _order_identifier(request)
        inner = BbmslQueryRequest(
            merchant_id=self.settings.merchant_id,
            order_id=order_id,
            merchant_reference=merchant_reference,
        )
        response = self._post(QUERY_PATH, inner)
        body = _answer_body(response)
        if body is None:
            raise NotSent(
                _http_refusal(response),
                code=f"HTTP_{response.status_code}",
                http_status=response.status_code,
            )
        code = _response_code(body, response)
        if code == SUCCESS_CODE:
            parsed = _parse(BbmslQueryResponse, body, response)
            return _order_result(parsed, request, response.status_code)
        error = _parse(BbmslErrorResponse, body, response)
        if code in QUERY_REFUSED_CODES:
            raise NotSent(
                f"bbmsl refused the order query: {_with_hint(code, error.message)}",
                code=code,
                http_status=response.status_code,
            )
        if code in QUERY_DECLINE_CODES:
            # The order itself is unknown (or cannot be named): no refund of it can exist.
            return GatewayResult(
                outcome=Outcome.DECLINED,
                code=code,
                message=error.message,
                http_status=response.status_code,
            )
        raise Ambiguous(
            f"bbmsl answered the order query with unexpected responseCode {code!r}: "
            f"{error.message}",
            code=code,
            http_status=response.status_code,
        )

    def signed_body(self, inner: BaseModel) -> bytes:
        """The envelope bytes for an inner request: the signed string is the string sent."""
        request_text = json_bytes(inner.model_dump(by_alias=True, exclude_none=True)).decode()
        signature = sign_request(self._key, request_text)
        envelope = BbmslEnvelope(request=request_text, signature=signature)
        return json_bytes(envelope.model_dump())

    def _post(self, path: str, inner: BaseModel) -> httpx.Response:
        request = self.client.build_request(
            "POST",
            self.settings.base_url.rstrip("/") + path,
            content=self.signed_body(inner),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        return send(self.client, request)


def _answer_body(response: httpx.Response) -> dict[str, Any] | None:
    """The JSON body of a bbmsl answer, or None for an HTTP-level refusal (a 4xx without a
    responseCode: nothing was processed)."""
    status = response.status_code
    if response.is_success:
        return parse_json_object(response)
    if 400 <= status < 500:
        # bbmsl answers everything with 200; a 4xx is a proxy or a wrong base URL refusing the
        # request before bbmsl saw it. If it does carry a responseCode, that code decides.
        try:
            body = parse_json_object(response)
        except Ambiguous:
            return None
        return body if isinstance(body.get("responseCode"), str) else None
    # 1xx/3xx: not an answer we know how to read, and the request may have been processed.
    raise Ambiguous(f"bbmsl answered HTTP {status}", code=f"HTTP_{status}", http_status=status)


def _http_refusal(response: httpx.Response) -> str:
    return (
        f"bbmsl answered HTTP {response.status_code} without a responseCode; "
        "check REFUNDQ_BBMSL_BASE_URL"
    )


def _refund_result(parsed: BbmslRefundResponse, amount: Decimal, http_status: int) -> GatewayResult:
    transaction = parsed.transaction
    raw_status = f"{transaction.status}/{parsed.order.status}"  # transaction/order
    outcome = STATUS_MAP.get(transaction.status)
    if transaction.type != "REFUND" or outcome is None:
        raise Ambiguous(
            f"bbmsl answered 0000 with a {transaction.type} transaction in status "
            f"{transaction.status!r}; the order query will tell what happened",
            code="UNKNOWN_STATUS",
            http_status=http_status,
        )
    reference = str(transaction.id)
    if outcome is Outcome.DECLINED:
        return GatewayResult(
            outcome=outcome,
            provider_reference=reference,
            raw_status=raw_status,
            code="TRANSACTION_DECLINED",
            message=parsed.message or "bbmsl declined the refund transaction",
            http_status=http_status,
        )
    if transaction.amount != amount:
        return GatewayResult(
            outcome=Outcome.UNRESOLVED,
            provider_reference=reference,
            raw_status=raw_status,
            code=SUCCESS_CODE,
            message=(
                f"bbmsl refunded {transaction.amount} on order {parsed.order.id}, but this job "
                f"asked {amount}: check the order in the BBMSL portal and resolve the job by hand"
            ),
            http_status=http_status,
            settled_amount=transaction.amount,
        )
    return GatewayResult(
        outcome=Outcome.SUCCEEDED,
        provider_reference=reference,
        raw_status=raw_status,
        code=SUCCESS_CODE,
        message=parsed.message,
        http_status=http_status,
        settled_amount=transaction.amount,
    )


def _order_result(
    parsed: BbmslQueryResponse, request: GatewayRequest, http_status: int
) -> GatewayResult:
    order = parsed.order
    outcome = ORDER_STATUS_MAP.get(order.status)
    if outcome is None:
        raise Ambiguous(
            f"bbmsl order {order.id} is in unknown status {order.status!r}",
            code="UNKNOWN_STATUS",
            http_status=http_status,
        )
    if order.status == BbmslOrderStatus.REFUNDED:
        refunded = order.amount - order.net_amount
        if request.amount is not None and refunded == request.amount:
            return GatewayResult(
                outcome=Outcome.SUCCEEDED,
                raw_status=order.status,
                code=SUCCESS_CODE,
                http_status=http_status,
                settled_amount=refunded,
            )
        return GatewayResult(
            outcome=Outcome.UNRESOLVED,
            raw_status=order.status,
            code=SUCCESS_CODE,
            message=(
                f"bbmsl order {order.id} is REFUNDED by {refunded} {order.currency or ''}, but "
                f"this job asked {request.amount}: another request refunded it (bbmsl refunds an "
                "order once). Check the order in the BBMSL portal and resolve the job by hand"
            ),
            http_status=http_status,
            settled_amount=refunded,
        )
    if outcome is Outcome.UNRESOLVED:
        message = (
            f"bbmsl order {order.id} is {order.status}: its money went back, but nothing says "
            "whether by this job's refund. Check the order in the BBMSL portal and resolve the "
            "job by hand"
        )
    else:
        message = f"bbmsl order {order.id} is {order.status}: not refunded"
    return GatewayResult(
        outcome=outcome,
        raw_status=order.status,
        code=SUCCESS_CODE,
        message=message,
        http_status=http_status,
    )


def _with_hint(code: str, message: str | None) -> str:
    """The gateway's message plus, for our own faults, what the operator should check."""
    text = message or f"bbmsl responseCode {code}"
    if code == "1001":
        return f"{text} (BBMSL does not hold the public key of {KEY_VARIABLE})"
    if code == "1002":
        return f"{text} (check REFUNDQ_BBMSL_MERCHANT_ID)"
    return text


def _response_code(body: dict[str, Any], response: httpx.Response) -> str:
    code = body.get("responseCode")
    if not isinstance(code, str):
        raise Ambiguous(
            f"bbmsl answered {response.status_code} without a responseCode",
            code="MALFORMED_RESPONSE",
            http_status=response.status_code,
        )
    return code


def _parse(model: type[ModelT], body: dict[str, Any], response: httpx.Response) -> ModelT:
    """A body in the documented shape, or `Ambiguous` (the refund may well have happened)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise Ambiguous(
            f"bbmsl answered {response.status_code} with an unexpected body: "
            f"{exc.error_count()} field error(s) at "
            f"{', '.join('.'.join(map(str, e['loc'])) for e in exc.errors())}",
            code="MALFORMED_RESPONSE",
            http_status=response.status_code,
        ) from exc
