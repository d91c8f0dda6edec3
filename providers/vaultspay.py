"""vaultspay: refund *requests*, reviewed by hand, polled by uuid (seed 002; GATEWAYS.md;
docs/inferred-contracts.md).

What the gateway guarantees, and what that means for refundq:
* A created refund request is reviewed and processed manually within three working days: create
  answers `PENDING` with the request's `uuid` as provider reference, and the engine polls
  `get-refund-request` (`settles_async`). Status 0/1 keep polling; 2 is success; 3 (cancelled) and
  4 (rejected) are final refusals.
* No idempotency key, and the status query needs the gateway's uuid: a create whose answer was
  lost can neither be resent safely nor looked up (`resend_safe=False`,
  `status_by_own_reference=False`), so it becomes `unknown` for an operator (DESIGN.md rule 5).
* Auth: `merchant-auth` exchanges the client id and secret for a token valid `token_expiry`
  seconds. The token is cached per provider instance (one per worker process, shared by its
  threads), refreshed shortly before expiry, and on a 401 refreshed once and the request resent
  once: a 401 is a refusal, nothing was applied, so that one resend is safe.
* The callback (only when we send `callbackHookUrl`) is **not signed**: `parse_callback` reads
  it, but it is a hint; the webhook confirms with `status()` before anything final is written.

Decisions and inferred parts (change them here, in the sandbox router and in the docs together):
* Inferred: the token travels as `Authorization: Bearer <token>`.
* `isPartial`: with `original_amount` known, "1" iff amount < original (equal -> "0", more ->
  refused at enqueue); otherwise the `partial` extra ("1"/"0"/"true"/"false"), default "0". When
  both are given they must agree. `amount` is always sent ("50.50"), for a full refund too.
* Errors are the envelope `{message, code, data}` with `code` repeating the HTTP status: 422/404
  and other 4xx -> declined with the gateway's message; 401 after a fresh token and 403 (the
  account's IP allow-list) -> failed, our configuration; a 4xx that is not JSON -> failed (a
  proxy or a wrong base URL refused it before the gateway saw it).
* A refused token request (bad client credentials: 401 on merchant-auth, or any 4xx there) fails
  the job at once with a message naming the variables to check; it is never retried in a loop.
  A token request that could not complete (transport, 5xx, garbage) raises `NotSent`: the refund
  itself was never sent.
* Status 3/4 -> declined with codes "VAULTSPAY_CANCELLED"/"VAULTSPAY_REJECTED" (stable for
  programs) and the gateway's `status_str` as message. Status 404 -> not found.
* An amount in an answer that differs from ours is `UNRESOLVED`: a human looks.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
)
from pydantic.alias_generators import to_camel
from pydantic_settings import SettingsConfigDict

from providers.base import (
    Ambiguous,
    Callback,
    Capabilities,
    GatewayError,
    GatewayRequest,
    GatewayResult,
    GatewaySettings,
    InvalidForGateway,
    Kind,
    NotSent,
    NotSupported,
    Outcome,
    Provider,
    RateLimited,
    json_bytes,
    parse_json_object,
    send,
)

ModelT = TypeVar("ModelT", bound=BaseModel)

AUTH_PATH = "/public/external/v1/merchant-auth"
CREATE_PATH = "/public/external/v1/create-refund-request"
STATUS_PATH = "/public/external/v1/get-refund-request"
SUCCESS_CODE = "200"
CREDENTIALS_HINT = "check REFUNDQ_VAULTSPAY_CLIENT_ID/REFUNDQ_VAULTSPAY_CLIENT_SECRET"
# Refresh this long before the token expires, so a token never dies between our check and the
# gateway's; for short-lived tokens at least half the lifetime is kept.
TOKEN_REFRESH_MARGIN_SECONDS = 60.0
CENT = Decimal("0.01")
PARTIAL_WORDS: dict[str, Literal["0", "1"]] = {"1": "1", "true": "1", "0": "0", "false": "0"}


class VaultspaySettings(GatewaySettings):
    model_config = SettingsConfigDict(
        env_prefix="REFUNDQ_VAULTSPAY_",
        env_file=".env",
        extra="ignore",
        # pydantic otherwise prints every input (the client secret included) in its errors.
        hide_input_in_errors=True,
    )

    base_url: str
    client_id: str
    client_secret: SecretStr
    # Public URL of our webhook; the worker builds each job's `callback_url` from it.
    callback_base_url: str | None = None


class VaultspayRefundStatus(enum.IntEnum):
    PENDING = 0
    INITIATED = 1
    PROCESSED = 2
    CANCELLED = 3
    REJECTED = 4


# Every status `get-refund-request` documents. Anything not listed is ambiguous, never success.
STATUS_MAP: dict[int, Outcome] = {
    VaultspayRefundStatus.PENDING: Outcome.PENDING,
    VaultspayRefundStatus.INITIATED: Outcome.PENDING,
    VaultspayRefundStatus.PROCESSED: Outcome.SUCCEEDED,
    VaultspayRefundStatus.CANCELLED: Outcome.DECLINED,
    VaultspayRefundStatus.REJECTED: Outcome.DECLINED,
}
DECLINE_CODES: dict[int, str] = {
    VaultspayRefundStatus.CANCELLED: "VAULTSPAY_CANCELLED",
    VaultspayRefundStatus.REJECTED: "VAULTSPAY_REJECTED",
}

# The callback's `status` as a hint (the webhook confirms it with `status()`).
CALLBACK_STATUS_MAP: dict[str, Outcome] = {
    "SUCCESS": Outcome.SUCCEEDED,
    "REJECTED": Outcome.DECLINED,
}


def _as_text(value: Any) -> Any:
    # The envelope's `code` is documented as "200"; accept 200 as well rather than call a
    # refund that was created ambiguous over a JSON type.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Code = Annotated[str, BeforeValidator(_as_text)]


class VaultspayAuthRequest(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    client_id: str
    client_secret: str


class VaultspayAuthData(BaseModel):
    model_config = ConfigDict(extra="allow")

    access_token: str = Field(min_length=1)
    token_expiry: int | float = Field(ge=0)  # seconds from now; 0: a new one every time


class VaultspayAuthResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str | None = None
    code: Code
    data: VaultspayAuthData


class VaultspayRefundRequest(BaseModel):
    """Strings throughout, as the page shows them."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    transaction_id: str
    is_partial: Literal["0", "1"]
    amount: str
    callback_hook_url: str | None = None


class VaultspayRefundData(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    uuid: str = Field(min_length=1)
    transaction_id: str | None = None
    is_partial: str | None = None
    amount: Decimal | None = None
    description: str | None = None
    created_at: str | None = None


class VaultspayRefundResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str | None = None
    code: Code
    data: VaultspayRefundData


class VaultspayStatusRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uuid: str


class VaultspayRefundRequestData(BaseModel):
    model_config = ConfigDict(extra="allow")

    uuid: str | None = None
    transaction_id: str | None = None
    amount: Decimal | None = None
    status: int
    description: str | None = None
    status_str: str | None = None
    created_at: str | None = None


class VaultspayStatusResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str | None = None
    code: Code
    data: VaultspayRefundRequestData


class VaultspayErrorResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str | None = None
    code: Code | None = None
    data: Any = None


class VaultspayCallback(BaseModel):
    """The callback hook body. Not signed: a hint to confirm with `status()`, never the truth."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    vp_transaction_id: str
    client_reference: str
    amount: Decimal
    fee: Decimal
    vat: Decimal
    status: str
    reference_id: str  # the refund request's uuid

    def hinted_outcome(self) -> Outcome | None:
        """What the callback claims (SUCCEEDED/DECLINED), or None for a status we do not know."""
        return CALLBACK_STATUS_MAP.get(self.status)


def parse_callback(body: bytes | str) -> VaultspayCallback:
    """Parse a callback body; `ValueError` (a `ValidationError` included) if it is not the
    documented shape. Amounts become Decimal, never float."""
    payload = json.loads(body, parse_float=Decimal)
    if not isinstance(payload, dict):
        raise ValueError("a vaultspay callback body is a JSON object")
    return VaultspayCallback.model_validate(payload)


def is_partial_flag(request: GatewayRequest) -> Literal["0", "1"]:
    """vaultspay's `isPartial` for a job; `InvalidForGateway` when it cannot be told or would be
    refused.

    | original_amount | amount vs original | extra `partial`       | isPartial |
    |-----------------|--------------------|-----------------------|-----------|
    | known           | less               | absent or "1"/"true"  | "1"       |
    | known           | equal              | absent or "0"/"false" | "0"       |
    | known           | more               | any                   | refused   |
    | known           | any                | disagrees             | refused   |
    | unknown         | -                  | "1"/"true"            | "1"       |
    | unknown         | -                  | "0"/"false"/absent    | "0"       |
    """
    explicit: Literal["0", "1"] | None = None
    word = request.extras.get("partial")
    if word is not None:
        explicit = PARTIAL_WORDS.get(word.strip().lower())
        if explicit is None:
            raise InvalidForGateway(
                f"vaultspay extra 'partial' is one of 1, 0, true, false; got {word!r}"
            )
    original, amount = request.original_amount, request.amount
    if original is None or amount is None:
        return explicit or "0"
    if amount > original:
        raise InvalidForGateway(
            f"vaultspay refund of {amount} exceeds the original amount {original}"
        )
    derived: Literal["0", "1"] = "1" if amount < original else "0"
    if explicit is not None and explicit != derived:
        raise InvalidForGateway(
            f"vaultspay extra partial={word!r} contradicts amount {amount} of original "
            f"{original} (a partial refund must be less than the full amount)"
        )
    return derived


class VaultspayAuthRefused(Exception):
    """merchant-auth refused our credentials or account: the job fails, nothing is retried."""

    def __init__(self, message: str, *, code: str, http_status: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status


@dataclass(frozen=True)
class AccessToken:
    value: str
    refresh_at: float  # on the provider's monotonic clock

    def __repr__(self) -> str:  # a token is a credential: never in a log line
        return f"AccessToken(value='**********', refresh_at={self.refresh_at})"


class VaultspayTokenAuth(httpx.Auth):
    """Bearer token, cached and shared by the threads of one worker process.

    The lock is held while a token is fetched, so concurrent jobs wait for one fetch instead of
    each asking merchant-auth (which may rate-limit or revoke earlier tokens)."""

    # The 401's body is read before the resend, which also returns its connection to the pool
    # before the token request needs one.
    requires_response_body = True

    def __init__(self, fetch_token: Callable[[], AccessToken], clock: Callable[[], float]) -> None:
        self._fetch_token = fetch_token
        self._clock = clock
        self._lock = threading.Lock()
        self._token: AccessToken | None = None

    def token(self, *, rejected: str | None = None) -> str:
        """A valid token: the cached one unless it is due for refresh or is the one just
        `rejected` by a 401 (another thread may already have replaced it: then that one)."""
        with self._lock:
            current = self._token
            if current is None or current.value == rejected or self._clock() >= current.refresh_at:
                current = self._token = self._fetch_token()
            return current.value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Refused, not applied: one fresh token and one resend are safe. A second 401 is the
            # final answer (the provider fails the job); there is no loop.
            request.headers["Authorization"] = f"Bearer {self.token(rejected=token)}"
            yield request


class VaultspayProvider(Provider):
    name = "vaultspay"
    capabilities = Capabilities(
        kinds=frozenset({Kind.REFUND}),
        status_query=True,
        status_by_own_reference=False,
        resend_safe=False,
        settles_async=True,
    )
    settings_class = VaultspaySettings
    extra_fields: ClassVar[dict[str, str]] = {
        "partial": "'1'/'true' for a partial refund, '0'/'false' for a full one; needed only "
        "when original_amount is unknown (default: full), must agree with it otherwise",
    }

    settings: VaultspaySettings

    def __init__(
        self,
        settings: VaultspaySettings,
        client: httpx.Client,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(settings, client)
        self._clock = clock
        self._auth = VaultspayTokenAuth(self._fetch_token, clock)

    @classmethod
    def parse_callback(cls, body: bytes) -> Callback:
        """The documented callback hook body as a hint (see `VaultspayCallback`)."""
        notice = parse_callback(body)
        return Callback(
            provider_reference=notice.reference_id,
            claimed_outcome=notice.hinted_outcome(),
            details={
                "status": notice.status,
                "amount": str(notice.amount),
                "fee": str(notice.fee),
                "vat": str(notice.vat),
                "vp_transaction_id": notice.vp_transaction_id,
            },
        )

    @classmethod
    def validate_request(cls, request: GatewayRequest) -> None:
        if request.kind is not Kind.REFUND:
            raise InvalidForGateway("vaultspay has no cancel; refund the transaction instead")
        if not request.payment_ref:
            raise InvalidForGateway("vaultspay needs the transactionId as payment_ref")
        amount = request.amount
        if amount is None:
            raise InvalidForGateway("a vaultspay refund needs an amount")
        exponent = amount.as_tuple().exponent
        if not isinstance(exponent, int) or exponent < -2:
            raise InvalidForGateway("vaultspay amounts carry at most 2 decimals")
        is_partial_flag(request)

    def refund(self, request: GatewayRequest) -> GatewayResult:
        assert request.amount is not None, "a refund always has an amount"
        amount = request.amount.quantize(CENT)
        body = VaultspayRefundRequest(
            transaction_id=request.payment_ref,
            is_partial=is_partial_flag(request),
            amount=f"{amount:f}",
            callback_hook_url=request.callback_url or None,
        )
        try:
            response = self._post(CREATE_PATH, body)
        except VaultspayAuthRefused as exc:
            return GatewayResult(
                outcome=Outcome.FAILED,
                code=exc.code,
                message=exc.message,
                http_status=exc.http_status,
            )
        if response.is_success:
            created = self._parse_success(VaultspayRefundResponse, response)
            return _created_result(created, amount, response.status_code)
        return _create_refusal(response)

    def status(self, request: GatewayRequest) -> GatewayResult:
        """Poll a refund request by its uuid. Errors are about the query, never the refund."""
        uuid = request.provider_reference
        if not uuid:
            raise NotSupported(
                "vaultspay's status query needs the refund request uuid (provider_reference)"
            )
        try:
            response = self._post(STATUS_PATH, VaultspayStatusRequest(uuid=uuid))
        except VaultspayAuthRefused as exc:
            raise NotSent(
                f"vaultspay status query not sent: {exc.message}",
                code=exc.code,
                http_status=exc.http_status,
            ) from exc
        if response.is_success:
            answer = self._parse_success(VaultspayStatusResponse, response)
            return _status_result(answer, request, uuid, response.status_code)
        error = _error_envelope(response)
        message = (error.message if error else None) or response.reason_phrase
        code = (error.code if error else None) or f"HTTP_{response.status_code}"
        if response.status_code == 404:
            return GatewayResult(
                outcome=Outcome.NOT_FOUND,
                provider_reference=uuid,
                code=code,
                message=message,
                http_status=404,
            )
        if 400 <= response.status_code < 500:
            hint = f"; {CREDENTIALS_HINT}" if response.status_code in (401, 403) else ""
            raise NotSent(
                f"vaultspay refused the status query ({response.status_code}): {message}{hint}",
                code=code,
                http_status=response.status_code,
            )
        raise Ambiguous(
            f"vaultspay answered the status query with HTTP {response.status_code}",
            code=code,
            http_status=response.status_code,
        )

    def _post(self, path: str, payload: BaseModel) -> httpx.Response:
        request = self.client.build_request(
            "POST",
            self.settings.base_url.rstrip("/") + path,
            content=json_bytes(payload.model_dump(by_alias=True, exclude_none=True)),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        return send(self.client, request, auth=self._auth)

    def _fetch_token(self) -> AccessToken:
        """One merchant-auth call. Whatever goes wrong here, the refund itself was not sent."""
        started = self._clock()
        credentials = VaultspayAuthRequest(
            client_id=self.settings.client_id,
            client_secret=self.settings.client_secret.get_secret_value(),
        )
        request = self.client.build_request(
            "POST",
            self.settings.base_url.rstrip("/") + AUTH_PATH,
            content=json_bytes(credentials.model_dump(by_alias=True)),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            response = send(self.client, request)
        except RateLimited:
            raise  # keeps the gateway's Retry-After
        except GatewayError as exc:
            # Whatever happened to merchant-auth (even an ambiguous read timeout or 500), the
            # refund waiting behind it was not sent.
            raise NotSent(
                f"no vaultspay access token: {exc.message}",
                code=exc.code,
                http_status=exc.http_status,
            ) from exc
        status = response.status_code
        if 400 <= status < 500:
            error = _error_envelope(response)
            message = (error.message if error else None) or response.reason_phrase
            raise VaultspayAuthRefused(
                f"vaultspay merchant-auth refused us ({status}: {message}); {CREDENTIALS_HINT}"
                + (" and the account's IP allow-list" if status == 403 else ""),
                code=(error.code if error else None) or f"HTTP_{status}",
                http_status=status,
            )
        unusable = NotSent(
            f"vaultspay merchant-auth answered {status} without a usable access token",
            code="MALFORMED_TOKEN_RESPONSE",
            http_status=status,
        )
        if not response.is_success:
            raise unusable
        try:
            answer = VaultspayAuthResponse.model_validate(parse_json_object(response))
        except ValidationError:
            # Not chained: a ValidationError quotes its input, and this input is the token.
            raise unusable from None
        except Ambiguous as exc:
            raise unusable from exc
        expiry = answer.data.token_expiry
        lifetime = max(expiry - TOKEN_REFRESH_MARGIN_SECONDS, expiry / 2)
        return AccessToken(value=answer.data.access_token, refresh_at=started + lifetime)

    @staticmethod
    def _parse_success(model: type[ModelT], response: httpx.Response) -> ModelT:
        """A 2xx in the documented success shape, or `Ambiguous`."""
        body = parse_json_object(response)
        code = _as_text(body.get("code"))
        if code != SUCCESS_CODE:
            raise Ambiguous(
                f"vaultspay answered HTTP {response.status_code} with envelope code {code!r}",
                code="MALFORMED_RESPONSE",
                http_status=response.status_code,
            )
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            where = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            raise Ambiguous(
                f"vaultspay answered {response.status_code} without the documented fields "
                f"({where})",
                code="MALFORMED_RESPONSE",
                http_status=response.status_code,
            ) from exc


def _created_result(
    created: VaultspayRefundResponse, amount: Decimal, http_status: int
) -> GatewayResult:
    data = created.data
    if data.amount is not None and data.amount != amount:
        return GatewayResult(
            outcome=Outcome.UNRESOLVED,
            provider_reference=data.uuid,
            code=created.code,
            message=(
                f"vaultspay created refund request {data.uuid} for {data.amount}, but this job "
                f"asked {amount}: check it in the VaultsPay portal and resolve the job by hand"
            ),
            http_status=http_status,
        )
    return GatewayResult(
        outcome=Outcome.PENDING,
        provider_reference=data.uuid,
        code=created.code,
        message=created.message,
        http_status=http_status,
    )


def _create_refusal(response: httpx.Response) -> GatewayResult:
    status = response.status_code
    if not 400 <= status < 500:
        # 1xx/3xx on a create: not an answer we can read, and the request may have been stored.
        raise Ambiguous(
            f"vaultspay answered the refund request with HTTP {status}",
            code=f"HTTP_{status}",
            http_status=status,
        )
    error = _error_envelope(response)
    if error is None:
        return GatewayResult(
            outcome=Outcome.FAILED,
            code=f"HTTP_{status}",
            message=(
                f"vaultspay answered HTTP {status} with a body that is not its JSON envelope; "
                "check REFUNDQ_VAULTSPAY_BASE_URL"
            ),
            http_status=status,
        )
    code = error.code or f"HTTP_{status}"
    message = error.message or response.reason_phrase
    if status == 401:
        # The auth flow already fetched a fresh token and resent once; the gateway refuses it.
        return GatewayResult(
            outcome=Outcome.FAILED,
            code=code,
            message=f"vaultspay refused a fresh access token ({message}); {CREDENTIALS_HINT}",
            http_status=status,
        )
    if status == 403:
        return GatewayResult(
            outcome=Outcome.FAILED,
            code=code,
            message=f"vaultspay refused us ({message}); check the account's IP allow-list",
            http_status=status,
        )
    return GatewayResult(outcome=Outcome.DECLINED, code=code, message=message, http_status=status)


def _status_result(
    answer: VaultspayStatusResponse, request: GatewayRequest, uuid: str, http_status: int
) -> GatewayResult:
    data = answer.data
    if data.uuid is not None and data.uuid != uuid:
        raise Ambiguous(
            f"vaultspay answered the status of {data.uuid!r} when asked for {uuid!r}",
            code="MISMATCHED_RESPONSE",
            http_status=http_status,
        )
    raw_status = f"{data.status}/{data.status_str}" if data.status_str else str(data.status)
    outcome = STATUS_MAP.get(data.status)
    if outcome is None:
        raise Ambiguous(
            f"vaultspay refund request {uuid} is in unknown status {raw_status!r}",
            code="UNKNOWN_STATUS",
            http_status=http_status,
        )
    if outcome is Outcome.DECLINED:
        return GatewayResult(
            outcome=outcome,
            provider_reference=uuid,
            raw_status=raw_status,
            code=DECLINE_CODES[data.status],
            message=data.status_str or f"vaultspay refund request status {data.status}",
            http_status=http_status,
        )
    if (
        outcome is Outcome.SUCCEEDED
        and data.amount is not None
        and request.amount is not None
        and data.amount != request.amount
    ):
        return GatewayResult(
            outcome=Outcome.UNRESOLVED,
            provider_reference=uuid,
            raw_status=raw_status,
            code=answer.code,
            message=(
                f"vaultspay processed refund request {uuid} for {data.amount}, but this job "
                f"asked {request.amount}: check it in the VaultsPay portal and resolve the job "
                "by hand"
            ),
            http_status=http_status,
            settled_amount=data.amount,
        )
    return GatewayResult(
        outcome=outcome,
        provider_reference=uuid,
        raw_status=raw_status,
        code=answer.code,
        message=data.status_str,
        http_status=http_status,
        settled_amount=data.amount if outcome is Outcome.SUCCEEDED else None,
    )


def _error_envelope(response: httpx.Response) -> VaultspayErrorResponse | None:
    """The `{message, code, data}` of a refusal, or None when the body is not that envelope."""
    try:
        return VaultspayErrorResponse.model_validate(parse_json_object(response))
    except (Ambiguous, ValidationError):
        return None
