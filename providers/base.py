"""The provider interface: what every gateway adapter looks like to the job engine.

A provider is a pure translation layer (DESIGN.md, STYLE.md): it builds a gateway request from a
`GatewayRequest`, signs it, sends it with the `httpx.Client` it was given, verifies and parses the
answer and maps it to one `GatewayResult`. It holds no database, no Celery and no global state.

Two channels, as in Hyperswitch's connectors:

* the gateway *answered* (yes, no, pending, never heard of it) -> a `GatewayResult` value;
* we could not talk to it, or cannot trust what came back -> a `GatewayError` exception whose type
  says what the job engine may do next (`NotSent`: safe to retry; `RateLimited`: retry after the
  gateway's delay; `Ambiguous`: the request may have been applied, resolve by rule 5).

The job engine (`worker.jobs`) never looks at provider names: it reads `Capabilities`.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from providers.config import env_with_files_sources


class Kind(enum.StrEnum):
    REFUND = "refund"
    CANCEL = "cancel"


class Outcome(enum.StrEnum):
    """What a gateway's answer means for our job. Only SUCCEEDED/DECLINED/FAILED are terminal."""

    SUCCEEDED = "succeeded"  # accepted or processed: the money is on its way (or the order is void)
    DECLINED = "declined"  # a definite business "no": nothing was refunded
    FAILED = "failed"  # our own fault (credentials, signature, merchant id): nothing was refunded
    PENDING = "pending"  # accepted, settles later: poll (`Capabilities.settles_async`)
    NOT_FOUND = "not_found"  # status query only: the gateway never received this refund
    UNRESOLVED = "unresolved"  # the gateway answered, but the answer cannot be matched to our job


@dataclass(frozen=True)
class Capabilities:
    """What a gateway guarantees; the job engine applies DESIGN.md rule 5 from these alone.

    * `status_query`: the gateway can say where a refund stands (`Provider.status`).
    * `status_by_own_reference`: that query finds our refund from *our* side's reference alone
      (bbmsl merchantReference, pgv2 merchantRefundNo), so it can settle a send whose answer was
      lost. When False (vaultspay: by the gateway's uuid only) it works only once the gateway's
      reference is known, i.e. for polling, never for resolving an ambiguous create.
    * `resend_safe`: sending the same request again with the same reference cannot refund twice
      (pgv2 `merchantRefundNo`, bbmsl's one refund per order). Only consulted after the status
      query answered NOT_FOUND, or when there is no status query at all.
    * `settles_async`: an accepted refund is PENDING until a later status (poll, callback).
    * `single_refund_per_payment`: the gateway refunds a payment at most once; a second job for
      the same payment is refused at enqueue instead of being declined by the gateway.
    * `max_attempts`: how many sends (and status checks) one job may spend before giving up.
    """

    kinds: frozenset[Kind]
    status_query: bool
    resend_safe: bool
    status_by_own_reference: bool = False
    settles_async: bool = False
    single_refund_per_payment: bool = False
    max_attempts: int = 6


@dataclass(frozen=True)
class GatewayRequest:
    """One job as a provider sees it. Amounts are Decimal in the currency's major unit."""

    job_id: str
    kind: Kind
    payment_ref: str
    currency: str
    amount: Decimal | None = None  # None for a cancel
    original_amount: Decimal | None = None
    reason: str | None = None
    extras: Mapping[str, str] = field(default_factory=dict)
    provider_reference: str | None = None  # the gateway's id for our refund, once known
    callback_url: str | None = None  # where the gateway may call us back (vaultspay)


@dataclass(frozen=True)
class GatewayResult:
    """The gateway answered. `code`/`message` are the gateway's own, for operators."""

    outcome: Outcome
    provider_reference: str | None = None
    raw_status: str | None = None
    code: str | None = None
    message: str | None = None
    http_status: int | None = None
    settled_amount: Decimal | None = None  # what the gateway says it refunded, when it says


@dataclass(frozen=True)
class Callback:
    """A gateway's unsolicited notice about one of our refunds. Gateways do not sign them (or
    we cannot check it), so a callback is a *hint*: the engine confirms with `Provider.status`
    before any state is written."""

    provider_reference: str
    claimed_outcome: Outcome | None  # what the notice claims, if it says something we know
    details: Mapping[str, str] = field(default_factory=dict)  # for the audit trail (no PII)


class GatewayError(Exception):
    """We could not get a trustworthy answer. Subclasses say what is safe next."""

    outcome_class: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status


class NotSent(GatewayError):
    """The request never reached the gateway (connect refused/timeout, DNS, pool timeout) or the
    gateway refused to handle it without acting (503). Safe to send again."""

    outcome_class = "not_sent"


class RateLimited(NotSent):
    """429: the gateway did not act on the request; wait `retry_after` seconds, then send again."""

    outcome_class = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Ambiguous(GatewayError):
    """The request may have reached the gateway and been applied, and no trustworthy answer came
    back (read timeout, 5xx, reset mid-response, malformed body, bad response signature).
    Never resend blindly: rule 5."""

    outcome_class = "ambiguous"


class NotSupported(Exception):
    """The gateway has no such verb (a cancel on a refund-only gateway, a status query on
    vai247). A programming error in the engine if it ever reaches a worker."""


class ProviderNotConfigured(Exception):
    """Settings for a provider are missing; carries the environment variable names."""

    def __init__(self, provider: str, missing: list[str]) -> None:
        self.provider = provider
        self.missing = missing
        super().__init__(
            f"provider {provider!r} is not configured: set {', '.join(missing)} "
            "(environment, .env file, or a *_FILE variable pointing at a file)"
        )


class InvalidForGateway(ValueError):
    """A request the gateway would refuse for its shape (length, digits); refused at enqueue."""


class GatewaySettings(BaseSettings):
    """Base of each provider's settings: `REFUNDQ_<GATEWAY>_<FIELD>` from the environment or a
    `.env` file, and for any field `REFUNDQ_<GATEWAY>_<FIELD>_FILE` naming a file that holds it.
    Secret fields are `SecretStr`, so they print as '**********'. An empty variable counts as
    unset. Subclasses set `model_config = SettingsConfigDict(env_prefix=...)`; the rest merges."""

    # hide_input_in_errors: a ValidationError would otherwise quote every input, secrets too.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", env_ignore_empty=True, hide_input_in_errors=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_with_files_sources(settings_cls, init_settings, env_settings, dotenv_settings)


# ---- One choke point for HTTP, shared by every provider (ActiveMerchant's `commit`). ----

# 503 means "the server is currently unable to handle the request" (RFC 9110 15.6.4): the
# gateway (or its load balancer) refused to process it, so it is retried like a 429. Every other
# 5xx may come after the refund was applied (500 from a crashed handler, 502/504 from a proxy
# that timed out waiting for it) and is ambiguous. This table is the one place to change that.
RETRYABLE_STATUS = frozenset({429, 503})
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "x-app-id", "cookie"})


def parse_retry_after(value: str | None, *, cap_seconds: float = 900.0) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        return min(float(value), cap_seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    from datetime import UTC, datetime

    delta = (when - datetime.now(UTC)).total_seconds()
    return min(max(delta, 0.0), cap_seconds)


def send(
    client: httpx.Client, request: httpx.Request, *, auth: httpx.Auth | None = None
) -> httpx.Response:
    """Send one request and classify transport failures; the response is read fully.

    Raises `NotSent` when no byte of the request can have been processed and `Ambiguous` when it
    may have been. 429/503 raise `RateLimited`/`NotSent`; other 5xx raise `Ambiguous`. Any other
    status is returned for the provider to interpret.
    """
    try:
        response = client.send(request, auth=auth) if auth is not None else client.send(request)
        response.read()
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise NotSent(
            f"could not connect for {_where(request)}: {type(exc).__name__}",
            code="CONNECT_FAILED",
        ) from exc
    except httpx.UnsupportedProtocol as exc:
        raise NotSent(f"bad gateway URL for {_where(request)}: {exc}", code="BAD_URL") from exc
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        # The bytes (or some of them) left; the gateway may have acted on them.
        raise Ambiguous(
            f"no complete answer to {_where(request)}: {type(exc).__name__}", code="NO_RESPONSE"
        ) from exc
    status = response.status_code
    if status < 400:
        return response
    where = _where(request)
    if status == 429:
        raise RateLimited(
            f"{where} was rate limited (429)",
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            code="HTTP_429",
            http_status=429,
        )
    if status in RETRYABLE_STATUS:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is not None:
            raise RateLimited(
                f"{where} answered {status} with Retry-After",
                retry_after=retry_after,
                code=f"HTTP_{status}",
                http_status=status,
            )
        raise NotSent(f"{where} answered {status}", code=f"HTTP_{status}", http_status=status)
    if status >= 500:
        raise Ambiguous(f"{where} answered {status}", code=f"HTTP_{status}", http_status=status)
    return response


def _where(request: httpx.Request) -> str:
    """The request as error messages name it: method and URL without its query."""
    return f"{request.method} {request.url.copy_with(query=None)}"


def parse_json_object(response: httpx.Response) -> dict[str, Any]:
    """The body as a JSON object, or `Ambiguous`: a garbled answer is not an answer."""
    try:
        body = json.loads(response.content, parse_float=Decimal)
    except ValueError as exc:
        raise Ambiguous(
            f"unreadable response body (HTTP {response.status_code}, not JSON)",
            code="MALFORMED_RESPONSE",
            http_status=response.status_code,
        ) from exc
    if not isinstance(body, dict):
        raise Ambiguous(
            f"unexpected response body (HTTP {response.status_code}, JSON but not an object)",
            code="MALFORMED_RESPONSE",
            http_status=response.status_code,
        )
    return body


# A Decimal stood in for by its marker (see `json_bytes`): compiled once, since a pattern built
# around each call's own marker was compiled afresh for every request (issue 7).
_MARKED_NUMBER = re.compile(r'"([0-9a-f]{16}):(-?\d+(?:\.\d+)?)"')


def json_bytes(payload: Mapping[str, Any]) -> bytes:
    """Compact, deterministic JSON for request bodies. Decimals become JSON numbers written
    exactly as they print (never through float), which is what vai247 and bbmsl expect."""
    # json cannot emit a raw number from a Decimal, so each one is emitted as a string carrying
    # a per-call random marker and unquoted afterwards. The marker is unguessable, so text in a
    # producer's `reason` can never be turned into a number.
    marker = secrets.token_hex(8)

    def encode(value: Any) -> Any:
        if isinstance(value, Decimal):
            return f"{marker}:{value}"
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")

    def unquote(match: re.Match[str]) -> str:
        return match.group(2) if match.group(1) == marker else match.group(0)

    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=encode)
    if marker in text:
        text = _MARKED_NUMBER.sub(unquote, text)
    return text.encode("utf-8")


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers safe to store in an attempt row or a log line."""
    return {
        name: ("[redacted]" if name.lower() in SECRET_HEADERS else value)
        for name, value in headers.items()
    }


class Provider(ABC):
    """One gateway. Subclasses set `name`, `capabilities`, `settings_class`, `extra_fields` and
    implement the verbs they support; unsupported verbs raise `NotSupported`."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    settings_class: ClassVar[type[GatewaySettings]]
    # Provider-specific keyword arguments a producer may pass (name -> what it means).
    extra_fields: ClassVar[Mapping[str, str]] = {}

    def __init__(self, settings: GatewaySettings, client: httpx.Client) -> None:
        self.settings = settings
        self.client = client

    @classmethod
    def validate_request(cls, request: GatewayRequest) -> None:
        """Refuse at enqueue what the gateway would refuse for its shape. Raise
        `InvalidForGateway` with a message that says what and why. Default: nothing to check."""
        return None

    @abstractmethod
    def refund(self, request: GatewayRequest) -> GatewayResult:
        """Ask the gateway to refund `request.amount` of `request.payment_ref`."""

    def cancel(self, request: GatewayRequest) -> GatewayResult:
        """Ask the gateway to cancel the order `request.payment_ref`."""
        raise NotSupported(f"{self.name} has no cancel")

    def status(self, request: GatewayRequest) -> GatewayResult:
        """Where the gateway holds our refund: SUCCEEDED, DECLINED, PENDING or NOT_FOUND."""
        raise NotSupported(f"{self.name} has no status query")

    @classmethod
    def parse_callback(cls, body: bytes) -> Callback:
        """Read a callback body the gateway POSTed to us; `ValueError` if it is not one."""
        raise NotSupported(f"{cls.name} sends no callbacks")

    def submit(self, request: GatewayRequest) -> GatewayResult:
        """The verb for the request's kind."""
        if request.kind is Kind.CANCEL:
            return self.cancel(request)
        return self.refund(request)
