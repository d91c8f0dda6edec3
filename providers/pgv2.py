"""pgv2: "pg/v2" refund create and inquiry, V2_SHA256-signed both ways (seed 003; GATEWAYS.md;
docs/inferred-contracts.md).

What the gateway guarantees, and what that means for refundq:
* The refund carries *our* `merchantRefundNo`, derived from the job id and identical on every
  resend, and the inquiry finds a refund by it: an ambiguous create is settled by asking
  (`status_by_own_reference`), and a resend after a NOT_FOUND reuses the number (`resend_safe`).
* What the gateway answers to a repeated `merchantRefundNo` is not documented (a replay of the
  first answer, or DUPLICATE_MERCHANT_REFUND_NO). A duplicate refusal is therefore never a
  decline: it raises `Ambiguous` and the inquiry decides.
* Requests and responses are signed: `Authorization: V2_SHA256 appId=..,sign=..,timestamp=..,
  nonce=..` with `sign` = lowercase hex SHA-256 of seven `\\n`-terminated lines (appId, appSecret,
  method, full URL, timestamp, nonce, body). A response whose signature is missing, unparseable or
  wrong is `Ambiguous` whatever its body says.

Decisions and inferred parts (change them here, in the sandbox router and in the docs together):
* Inferred, the project's fixed assumption: the response is signed over the same seven lines with
  the *request's* method and URL and the *response* header's own timestamp and nonce and the
  exact response body (`verify_response_signature`, the one place to change). The response's
  timestamp is not checked for freshness and its nonce not remembered (nothing documents either).
* Inferred: `POST /pg/v2/refund/query {merchantRefundNo}` answers the create `data` plus `status`
  PROCESSING | SUCCESS | FAILED, or code REFUND_NOT_FOUND.
* An accepted refund is final for us: code OK on create, and PROCESSING or SUCCESS on the
  inquiry, are `succeeded` (raw status kept); FAILED is `declined`.
* SIGN_ERROR is our fault (failed; nothing applied, docs/inferred-contracts.md). NONCE_REUSED
  means a copy of this very request got there first (our nonces are random): ambiguous.
  Every response is signed and HTTP 200, so a signed code decides whatever the HTTP status; an
  unsigned non-200 is as untrustworthy as any unsigned answer (ambiguous).
* `merchantRefundNo` is the job id itself (32 hex characters) when it is at most 50 safe
  characters, else "rq-" and 47 hex characters of its SHA-256: stable, and never truncated into a
  collision.
* `description` is the job's reason, or "Refund" without one; a reason over 80 characters is
  refused at enqueue rather than silently cut.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
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

ModelT = TypeVar("ModelT", bound=BaseModel)

CREATE_PATH = "/pg/v2/refund/create"
QUERY_PATH = "/pg/v2/refund/query"
AUTH_SCHEME = "V2_SHA256"
OK = "OK"
BAD_RESPONSE_SIGNATURE = "BAD_RESPONSE_SIGNATURE"
DUPLICATE_MERCHANT_REFUND_NO = "DUPLICATE_MERCHANT_REFUND_NO"
REFUND_NOT_FOUND = "REFUND_NOT_FOUND"
MAX_REFERENCE_LENGTH = 50  # merchantRefundNo and paymentNo
MAX_DESCRIPTION_LENGTH = 80
MAX_INTEGER_DIGITS = 15
DEFAULT_DESCRIPTION = "Refund"
CENT = Decimal("0.01")
_SAFE_REFERENCE = re.compile(r"[A-Za-z0-9_-]{1,50}")
_HEX_SIGN = re.compile(r"[0-9a-fA-F]{64}")


class Pgv2Settings(GatewaySettings):
    model_config = SettingsConfigDict(
        env_prefix="REFUNDQ_PGV2_",
        env_file=".env",
        extra="ignore",
        # pydantic otherwise prints every input (the app secret included) in its errors.
        hide_input_in_errors=True,
    )

    base_url: str
    app_id: str
    app_secret: SecretStr


class Pgv2RefundStatus(enum.StrEnum):
    PROCESSING = "PROCESSING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"


# The inquiry's refund status. Anything not listed is ambiguous, never success.
STATUS_MAP: dict[str, Outcome] = {
    Pgv2RefundStatus.PROCESSING: Outcome.SUCCEEDED,  # accepted: the money is on its way
    Pgv2RefundStatus.SUCCESS: Outcome.SUCCEEDED,
    Pgv2RefundStatus.FAILED: Outcome.DECLINED,
}

# Non-OK codes of refund/create. DUPLICATE_MERCHANT_REFUND_NO and unknown codes are ambiguous.
CODE_MAP: dict[str, Outcome] = {
    "SIGN_ERROR": Outcome.FAILED,
    "PARAM_ERROR": Outcome.DECLINED,
    "PAYMENT_NOT_FOUND": Outcome.DECLINED,
    "REFUND_AMOUNT_EXCEEDED": Outcome.DECLINED,
    "PAYMENT_NOT_REFUNDABLE": Outcome.DECLINED,
}
# Refusals of an inquiry: the query was not handled, which says nothing about the refund.
QUERY_REFUSED_CODES = frozenset({"SIGN_ERROR", "NONCE_REUSED", "PARAM_ERROR"})


# ---- Signatures: one string to sign, one header format, one response check. ----


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
    """The seven lines, each ending in "\\n"; the body is used as the exact bytes."""
    head = "".join(f"{line}\n" for line in (app_id, app_secret, method, url, timestamp, nonce))
    return head.encode("utf-8") + body + b"\n"


def compute_sign(
    *,
    app_id: str,
    app_secret: str,
    method: str,
    url: str,
    timestamp: str,
    nonce: str,
    body: bytes,
) -> str:
    """Lowercase hex SHA-256 of `string_to_sign`."""
    return hashlib.sha256(
        string_to_sign(
            app_id=app_id,
            app_secret=app_secret,
            method=method,
            url=url,
            timestamp=timestamp,
            nonce=nonce,
            body=body,
        )
    ).hexdigest()


@dataclass(frozen=True)
class Pgv2Authorization:
    """`V2_SHA256 appId=<appId>,sign=<hex>,timestamp=<unix ms>,nonce=<hex>`."""

    app_id: str
    sign: str
    timestamp: str
    nonce: str

    def header_value(self) -> str:
        return (
            f"{AUTH_SCHEME} appId={self.app_id},sign={self.sign},"
            f"timestamp={self.timestamp},nonce={self.nonce}"
        )

    @classmethod
    def parse(cls, header: str) -> Pgv2Authorization:
        """Parse a header value; `ValueError` saying what is wrong with it."""
        scheme, _, credentials = header.strip().partition(" ")
        if scheme != AUTH_SCHEME:
            raise ValueError(f"scheme is not {AUTH_SCHEME}")
        fields: dict[str, str] = {}
        for item in credentials.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or not key or not value or key in fields:
                raise ValueError("credentials are not key=value pairs with unique keys")
            fields[key] = value.strip()
        missing = {"appId", "sign", "timestamp", "nonce"} - fields.keys()
        if missing:
            raise ValueError(f"missing {', '.join(sorted(missing))}")
        if not _HEX_SIGN.fullmatch(fields["sign"]):
            raise ValueError("sign is not 64 hex characters")
        if not fields["timestamp"].isdigit() or not fields["timestamp"].isascii():
            raise ValueError("timestamp is not unix milliseconds")
        return cls(
            app_id=fields["appId"],
            sign=fields["sign"],
            timestamp=fields["timestamp"],
            nonce=fields["nonce"],
        )


def new_nonce() -> str:
    """32 hex characters (upper case, as in the seed's example), fresh per send."""
    return secrets.token_hex(16).upper()


def now_ms() -> str:
    return str(time.time_ns() // 1_000_000)


class Pgv2Signer(httpx.Auth):
    """Signs each send with a fresh timestamp and nonce, over the exact body bytes sent."""

    def __init__(
        self,
        settings: Pgv2Settings,
        *,
        clock_ms: Callable[[], str] = now_ms,
        nonce: Callable[[], str] = new_nonce,
    ) -> None:
        self._settings = settings
        self._clock_ms = clock_ms
        self._nonce = nonce

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        timestamp, nonce = self._clock_ms(), self._nonce()
        sign = compute_sign(
            app_id=self._settings.app_id,
            app_secret=self._settings.app_secret.get_secret_value(),
            method=request.method,
            url=str(request.url),
            timestamp=timestamp,
            nonce=nonce,
            body=request.content,
        )
        authorization = Pgv2Authorization(
            app_id=self._settings.app_id, sign=sign, timestamp=timestamp, nonce=nonce
        )
        request.headers["Authorization"] = authorization.header_value()
        yield request


def verify_response_signature(settings: Pgv2Settings, response: httpx.Response) -> None:
    """Raise `Ambiguous` unless the response's Authorization header signs its exact body.

    Inferred (GATEWAYS.md): the seven lines use the *request's* method and full URL and the
    *response* header's timestamp and nonce. This function is the one place to change that."""

    def untrusted(why: str) -> Ambiguous:
        return Ambiguous(
            f"pgv2 answer to {response.request.method} {response.request.url.path} is not "
            f"trustworthy (HTTP {response.status_code}): {why}",
            code=BAD_RESPONSE_SIGNATURE,
            http_status=response.status_code,
        )

    header = response.headers.get("Authorization")
    if header is None:
        raise untrusted("no Authorization header")
    try:
        authorization = Pgv2Authorization.parse(header)
    except ValueError as exc:
        raise untrusted(f"unparseable Authorization header ({exc})") from None
    if not hmac.compare_digest(
        authorization.app_id.encode("utf-8"), settings.app_id.encode("utf-8")
    ):
        raise untrusted("signed for another appId")
    expected = compute_sign(
        app_id=settings.app_id,
        app_secret=settings.app_secret.get_secret_value(),
        method=response.request.method,
        url=str(response.request.url),
        timestamp=authorization.timestamp,
        nonce=authorization.nonce,
        body=response.content,
    )
    if not hmac.compare_digest(expected, authorization.sign.lower()):
        raise untrusted("wrong sign")


# ---- Wire models. ----


class _Wire(BaseModel):
    """pgv2's camelCase names on snake_case fields; unknown response fields are kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class Pgv2RefundRequest(_Wire):
    model_config = ConfigDict(extra="forbid")

    merchant_refund_no: str
    payment_no: str
    amount: str  # "100.05": 1-15 integer digits, exactly 2 decimals
    description: str


class Pgv2RefundQueryRequest(_Wire):
    model_config = ConfigDict(extra="forbid")

    merchant_refund_no: str


class Pgv2RefundData(_Wire):
    refund_no: str
    payment_no: str | None = None
    merchant_refund_no: str | None = None
    amount: Decimal | None = None
    currency: str | None = None


class Pgv2RefundQueryData(Pgv2RefundData):
    status: str


class Pgv2Envelope(_Wire):
    """Every answer: the code decides, `data` is read only for OK."""

    code: str
    error_message: str | None = None
    data: Any = None


class Pgv2RefundResponse(_Wire):
    code: str
    error_message: str | None = None
    data: Pgv2RefundData


class Pgv2RefundQueryResponse(_Wire):
    code: str
    error_message: str | None = None
    data: Pgv2RefundQueryData


def merchant_refund_no(job_id: str) -> str:
    """Our refund number for a job: the same on every send, at most 50 characters."""
    if _SAFE_REFERENCE.fullmatch(job_id):
        return job_id
    return "rq-" + hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:47]


def refund_description(request: GatewayRequest) -> str:
    reason = (request.reason or "").strip()
    return reason or DEFAULT_DESCRIPTION


class Pgv2Provider(Provider):
    name = "pgv2"
    capabilities = Capabilities(
        kinds=frozenset({Kind.REFUND}),
        status_query=True,
        status_by_own_reference=True,
        resend_safe=True,
    )
    settings_class = Pgv2Settings
    extra_fields: ClassVar[dict[str, str]] = {}

    settings: Pgv2Settings

    def __init__(
        self,
        settings: Pgv2Settings,
        client: httpx.Client,
        *,
        signer: Pgv2Signer | None = None,
    ) -> None:
        super().__init__(settings, client)
        self._signer = signer or Pgv2Signer(settings)

    @classmethod
    def validate_request(cls, request: GatewayRequest) -> None:
        if request.kind is not Kind.REFUND:
            raise InvalidForGateway("pgv2 has no cancel; refund the payment instead")
        if not 1 <= len(request.payment_ref) <= MAX_REFERENCE_LENGTH:
            raise InvalidForGateway(
                f"pgv2 paymentNo (payment_ref) must be 1-{MAX_REFERENCE_LENGTH} characters, "
                f"got {len(request.payment_ref)}"
            )
        amount = request.amount
        if amount is None:
            raise InvalidForGateway("a pgv2 refund needs an amount")
        exponent = amount.as_tuple().exponent
        if not isinstance(exponent, int) or exponent < -2:
            raise InvalidForGateway("pgv2 amounts carry at most 2 decimals")
        if len(str(abs(int(amount)))) > MAX_INTEGER_DIGITS:
            raise InvalidForGateway(
                f"pgv2 amounts have at most {MAX_INTEGER_DIGITS} integer digits"
            )
        description = refund_description(request)
        if len(description) > MAX_DESCRIPTION_LENGTH:
            raise InvalidForGateway(
                f"pgv2 descriptions (the reason) are at most {MAX_DESCRIPTION_LENGTH} "
                f"characters, got {len(description)}"
            )

    def refund(self, request: GatewayRequest) -> GatewayResult:
        assert request.amount is not None, "a refund always has an amount"
        amount = request.amount.quantize(CENT)
        our_number = merchant_refund_no(request.job_id)
        body = Pgv2RefundRequest(
            merchant_refund_no=our_number,
            payment_no=request.payment_ref,
            amount=f"{amount:f}",
            description=refund_description(request),
        )
        response = self._post(CREATE_PATH, body)
        envelope = _envelope(response)
        if envelope.code == OK:
            parsed = _parse(Pgv2RefundResponse, response)
            _check_is_ours(parsed.data, our_number, response)
            return _accepted(parsed.data, None, amount, envelope, response.status_code)
        if envelope.code == "NONCE_REUSED":
            # Our nonces are random per send, so the gateway saw this very request before:
            # something between us re-sent it, and that first copy may have been applied.
            raise Ambiguous(
                f"pgv2 saw this request's nonce before ({envelope.error_message or 'reused'}); "
                "a copy of it may have been applied: ask the refund inquiry",
                code="NONCE_REUSED",
                http_status=response.status_code,
            )
        if envelope.code == DUPLICATE_MERCHANT_REFUND_NO:
            # Our number was seen before: an earlier send of this very job got through. Only the
            # inquiry can say how it ended; a decline here could hide a refund that happened.
            raise Ambiguous(
                f"pgv2 already has merchantRefundNo {our_number}: "
                f"{envelope.error_message or 'duplicate'}; ask the refund inquiry",
                code=DUPLICATE_MERCHANT_REFUND_NO,
                http_status=response.status_code,
            )
        outcome = CODE_MAP.get(envelope.code)
        if outcome is None:
            raise Ambiguous(
                f"pgv2 answered the refund with unknown code {envelope.code!r}: "
                f"{envelope.error_message}",
                code=envelope.code,
                http_status=response.status_code,
            )
        message = envelope.error_message or envelope.code
        if outcome is Outcome.FAILED:
            message += " (check REFUNDQ_PGV2_APP_ID/REFUNDQ_PGV2_APP_SECRET and this host's clock)"
        return GatewayResult(
            outcome=outcome,
            code=envelope.code,
            message=message,
            http_status=response.status_code,
        )

    def status(self, request: GatewayRequest) -> GatewayResult:
        """Ask the refund inquiry by our merchantRefundNo. Errors are about the query only."""
        our_number = merchant_refund_no(request.job_id)
        response = self._post(QUERY_PATH, Pgv2RefundQueryRequest(merchant_refund_no=our_number))
        envelope = _envelope(response)
        if envelope.code == REFUND_NOT_FOUND:
            return GatewayResult(
                outcome=Outcome.NOT_FOUND,
                code=envelope.code,
                message=envelope.error_message,
                http_status=response.status_code,
            )
        if envelope.code in QUERY_REFUSED_CODES:
            raise NotSent(
                f"pgv2 refused the refund inquiry: {envelope.code} {envelope.error_message}",
                code=envelope.code,
                http_status=response.status_code,
            )
        if envelope.code != OK:
            raise Ambiguous(
                f"pgv2 answered the refund inquiry with unexpected code {envelope.code!r}: "
                f"{envelope.error_message}",
                code=envelope.code,
                http_status=response.status_code,
            )
        parsed = _parse(Pgv2RefundQueryResponse, response)
        data = parsed.data
        _check_is_ours(data, our_number, response)
        outcome = STATUS_MAP.get(data.status)
        if outcome is None:
            raise Ambiguous(
                f"pgv2 refund {data.refund_no} is in unknown status {data.status!r}",
                code="UNKNOWN_STATUS",
                http_status=response.status_code,
            )
        if outcome is Outcome.DECLINED:
            return GatewayResult(
                outcome=outcome,
                provider_reference=data.refund_no,
                raw_status=data.status,
                code="REFUND_FAILED",
                message=envelope.error_message or f"pgv2 reports refund {data.refund_no} FAILED",
                http_status=response.status_code,
            )
        return _accepted(data, data.status, request.amount, envelope, response.status_code)

    def _post(self, path: str, payload: BaseModel) -> httpx.Response:
        request = self.client.build_request(
            "POST",
            self.settings.base_url.rstrip("/") + path,
            content=json_bytes(payload.model_dump(by_alias=True)),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        response = send(self.client, request, auth=self._signer)
        verify_response_signature(self.settings, response)
        return response


def _envelope(response: httpx.Response) -> Pgv2Envelope:
    """`{code, errorMessage, data}` of a signed answer, or `Ambiguous`."""
    body = parse_json_object(response)
    try:
        return Pgv2Envelope.model_validate(body)
    except ValidationError as exc:
        raise Ambiguous(
            f"pgv2 answered {response.status_code} without a code",
            code="MALFORMED_RESPONSE",
            http_status=response.status_code,
        ) from exc


def _parse(model: type[ModelT], response: httpx.Response) -> ModelT:
    """An OK body in the documented shape, or `Ambiguous` (the refund may well have happened)."""
    try:
        return model.model_validate(parse_json_object(response))
    except ValidationError as exc:
        where = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise Ambiguous(
            f"pgv2 answered OK without the documented fields ({where})",
            code="MALFORMED_RESPONSE",
            http_status=response.status_code,
        ) from exc


def _check_is_ours(data: Pgv2RefundData, our_number: str, response: httpx.Response) -> None:
    if data.merchant_refund_no is not None and data.merchant_refund_no != our_number:
        raise Ambiguous(
            f"pgv2 answered about merchantRefundNo {data.merchant_refund_no!r}, "
            f"not ours ({our_number!r})",
            code="MISMATCHED_RESPONSE",
            http_status=response.status_code,
        )


def _accepted(
    data: Pgv2RefundData,
    raw_status: str | None,
    amount: Decimal | None,
    envelope: Pgv2Envelope,
    http_status: int,
) -> GatewayResult:
    if data.amount is not None and amount is not None and data.amount != amount:
        return GatewayResult(
            outcome=Outcome.UNRESOLVED,
            provider_reference=data.refund_no,
            raw_status=raw_status,
            code=envelope.code,
            message=(
                f"pgv2 refund {data.refund_no} is for {data.amount}, but this job asked "
                f"{amount}: check it with the gateway and resolve the job by hand"
            ),
            http_status=http_status,
            settled_amount=data.amount,
        )
    return GatewayResult(
        outcome=Outcome.SUCCEEDED,
        provider_reference=data.refund_no,
        raw_status=raw_status,
        code=envelope.code,
        message=envelope.error_message,
        http_status=http_status,
        settled_amount=data.amount,
    )
