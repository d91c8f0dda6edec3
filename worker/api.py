"""refundq's HTTP side (FastAPI; `uvicorn worker.api:app`): the shops' API, health, metrics and
gateway callbacks.

OpenAPI at `/openapi.json`; docs/http-api.md is the guide. Runs in its own processes (`web` in the
Procfile); it shares the database and the broker with the workers and never talks to a gateway
itself. The `/v1` routes are the Python API over HTTP (`worker.client`): the same validation,
the same idempotency (keys scoped per API key name), the same job view.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from providers.base import Kind
from worker.apikeys import ApiKey
from worker.callbacks import CallbackRejected, receive_callback
from worker.errors import IdempotencyConflict, InvalidRequest, JobNotFound
from worker.views import JobView

# A shop's Idempotency-Key, stored as "<api key name>/<key>" within the jobs' 255 characters.
MAX_IDEMPOTENCY_KEY = 200
MAX_BODY_BYTES = 64 * 1024
PAGE_DEFAULT = 50
PAGE_MAX = 200
_PRINTABLE = re.compile(r"[\x21-\x7e][\x20-\x7e]*")


# ---- request and response bodies -------------------------------------------------------------

_AMOUNT_HELP = (
    'A JSON string with a decimal point, e.g. "50.00" — never a JSON number: many JSON '
    "libraries read numbers as binary floats, and a float cannot hold money exactly."
)
_EXTRAS_HELP = (
    "Provider parameters, name to string: bbmsl `order_id`, vaultspay `partial` (`1`/`0`)."
)


class RefundBody(BaseModel):
    """`POST /v1/refunds`: the arguments of `worker.client.enqueue_refund`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "provider": "vai247",
                    "payment_ref": "ord_abc123",
                    "amount": "50.00",
                    "currency": "USD",
                    "original_amount": "80.00",
                    "reason": "Customer request",
                    "notify_url": "https://shop.example/refundq/notifications",
                }
            ]
        },
    )

    provider: str = Field(description="vai247, bbmsl, vaultspay or pgv2.")
    payment_ref: str = Field(description="The gateway's reference of the original payment.")
    amount: str = Field(description=_AMOUNT_HELP)
    currency: str = Field(description="ISO 4217 code, e.g. USD.")
    reason: str | None = Field(default=None, description="Why (sent to the gateway).")
    original_amount: str | None = Field(
        default=None,
        description="The payment's amount (a string, like `amount`): this payment's refunds "
        "never add up to more.",
    )
    notify_url: str | None = Field(
        default=None,
        description="refundq POSTs the job here, signed, when it is final or unknown.",
    )
    extras: dict[str, str] = Field(default_factory=dict, description=_EXTRAS_HELP)


class CancelBody(BaseModel):
    """`POST /v1/cancellations`: the arguments of `worker.client.enqueue_cancel`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"provider": "vai247", "payment_ref": "ord_abc123"}]},
    )

    provider: str = Field(description="vai247, bbmsl, vaultspay or pgv2.")
    payment_ref: str = Field(description="The gateway's reference of the order to cancel.")
    reason: str | None = Field(default=None, description="Why (sent to the gateway).")
    currency: str | None = Field(default=None, description="Optional ISO 4217 code.")
    notify_url: str | None = Field(
        default=None,
        description="refundq POSTs the job here, signed, when it is final or unknown.",
    )
    extras: dict[str, str] = Field(default_factory=dict, description=_EXTRAS_HELP)


class ErrorDetail(BaseModel):
    type: str = Field(
        description="invalid_request, idempotency_conflict, unauthorized, not_found, "
        "payload_too_large or unavailable."
    )
    message: str
    field: str | None = Field(
        default=None, description="invalid_request: the body field, header or parameter."
    )
    idempotency_key: str | None = Field(default=None, description="idempotency_conflict only.")
    job_id: str | None = Field(
        default=None, description="idempotency_conflict: the job the key belongs to."
    )


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobPage(BaseModel):
    jobs: list[JobView]
    next: str | None = Field(
        description="Pass as `after` for the next page; null on the last page."
    )


class ApiError(Exception):
    """An answer other than success, in the one error shape (`ErrorBody`)."""

    def __init__(
        self,
        status_code: int,
        kind: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **details: str | None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = {"error": {"type": kind, "message": message, **details}}
        self.headers = headers


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", message, field=field)


# ---- authentication --------------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key made by `refundq apikey create NAME`: `Authorization: Bearer rq_…`.",
)


def authenticate(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The caller's API key, or 401. Runs before the request is validated: a caller without a
    valid key learns nothing about what it sent."""
    from worker.apikeys import keyring

    if credentials is None:
        raise ApiError(
            401,
            "unauthorized",
            "send an API key: `Authorization: Bearer <key>` (`refundq apikey create NAME`)",
            headers={"WWW-Authenticate": 'Bearer realm="refundq"'},
        )
    caller = keyring.verify(credentials.credentials)
    if caller is None:
        hint = "" if keyring.configured() else " (no API keys are configured on this server)"
        raise ApiError(
            401,
            "unauthorized",
            f"the API key is not valid: unknown, revoked or mistyped{hint}",
            headers={"WWW-Authenticate": 'Bearer realm="refundq", error="invalid_token"'},
        )
    return caller


Caller = Annotated[ApiKey, Depends(authenticate)]
IdempotencyKeyHeader = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        description="Your key for this request (up to 200 printable ASCII characters). The same "
        "key with the same body returns the same job (200); with a different body, 409. Scoped "
        "to your API key's name.",
    ),
]


# ---- the app ---------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or not a valid one."},
    422: {"model": ErrorBody, "description": "Bad input; `field` names it. Nothing stored."},
}


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The request body, documented from `model` but read by the route itself (so the API key
    is checked before the body, and every error has the one shape)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def create_app() -> FastAPI:
    from worker.metrics import make_registry

    api = FastAPI(
        title="refundq",
        summary="Refunds and cancels that reach the payment gateway exactly once.",
        description="Shops enqueue refunds and cancels and follow their jobs; see "
        "docs/http-api.md for authentication, idempotency, notifications and metrics.",
        version="0.1.0",
    )
    registry = make_registry()
    _install_error_handlers(api)

    @api.get("/healthz", tags=["operations"])
    def healthz() -> JSONResponse:
        """Whether the database and the broker answer; 503 names what is down."""
        checks = {"database": _check_database(), "broker": _check_broker()}
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse(checks, status_code=200 if healthy else 503)

    @api.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text."}},
    )
    def metrics() -> Response:
        """Prometheus metrics, read from the database: the workers' activity included."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @api.post("/webhooks/{provider}/{token}", tags=["callbacks"], status_code=200)
    async def gateway_callback(provider: str, token: str, request: Request) -> JSONResponse:
        """A gateway's callback (vaultspay). Authenticated by the per-job token in the URL;
        recorded, then confirmed with the gateway before any state changes."""
        from worker.app import publish_poll

        body = await request.body()
        try:
            receipt = receive_callback(provider, token, body, publish_poll=publish_poll)
        except CallbackRejected as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status_code)
        return JSONResponse(
            {"received": True, "duplicate": receipt.duplicate, "confirming": receipt.confirming}
        )

    submitted: dict[int | str, dict[str, Any]] = {
        202: {"model": JobView, "description": "A new job, queued."},
        200: {"model": JobView, "description": "A replay: the job this key made, as it is now."},
        409: {"model": ErrorBody, "description": "The key was used for a different request."},
        413: {"model": ErrorBody, "description": "The body is over 64 KiB."},
        **_ERRORS,
    }

    @api.post(
        "/v1/refunds",
        tags=["jobs"],
        status_code=202,
        response_model=None,
        responses=submitted,
        openapi_extra=_body_schema(RefundBody),
    )
    async def create_refund(
        request: Request, caller: Caller, idempotency_key: IdempotencyKeyHeader
    ) -> JSONResponse:
        """Refund `amount` of a payment, exactly once. Answers at once; the job's status tells
        the rest (`GET /v1/jobs/{id}`, or a notification to `notify_url`)."""
        body = _parse(RefundBody, await _read_body(request), "refund")
        return await run_in_threadpool(_submit, Kind.REFUND, caller, idempotency_key, body)

    @api.post(
        "/v1/cancellations",
        tags=["jobs"],
        status_code=202,
        response_model=None,
        responses=submitted,
        openapi_extra=_body_schema(CancelBody),
    )
    async def create_cancellation(
        request: Request, caller: Caller, idempotency_key: IdempotencyKeyHeader
    ) -> JSONResponse:
        """Cancel an order that has not completed, exactly once."""
        body = _parse(CancelBody, await _read_body(request), "cancellation")
        return await run_in_threadpool(_submit, Kind.CANCEL, caller, idempotency_key, body)

    @api.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        response_model=JobView,
        responses={404: {"model": ErrorBody, "description": "No such job."}, **_ERRORS},
    )
    def read_job(job_id: str, caller: Caller) -> JSONResponse:
        """One job as it stands now."""
        from worker.client import get_job

        try:
            view = get_job(job_id)
        except JobNotFound:
            raise ApiError(404, "not_found", f"no job {job_id!r}") from None
        return JSONResponse(view.model_dump(mode="json"))

    @api.get("/v1/jobs", tags=["jobs"], response_model=JobPage, responses=_ERRORS)
    def list_jobs(
        caller: Caller,
        status: Annotated[str | None, Query(description="Only jobs in this status.")] = None,
        provider: Annotated[str | None, Query(description="Only this provider's jobs.")] = None,
        limit: Annotated[
            int, Query(ge=1, le=PAGE_MAX, description="Jobs per page.")
        ] = PAGE_DEFAULT,
        after: Annotated[str | None, Query(description="The `next` of the previous page.")] = None,
    ) -> JSONResponse:
        """Jobs, newest first, a page at a time (keyset pagination: stable while jobs are
        added)."""
        from worker.client import list_jobs as list_views

        try:
            views = list_views(status=status, provider=provider, limit=limit + 1, after=after)
        except InvalidRequest as exc:
            raise _invalid(exc.field, exc.message) from None
        page = views[:limit]
        following = page[-1].id if len(views) > limit else None
        return JSONResponse(
            {"jobs": [view.model_dump(mode="json") for view in page], "next": following}
        )

    return api


# ---- submitting ------------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "payload_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    return body


def _parse(model: type[BaseModel], raw: bytes, what: str) -> dict[str, Any]:
    try:
        return model.model_validate_json(raw or b"null").model_dump()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field, message = _describe(first, model, what)
        raise _invalid(field, message) from None


def _describe(error: Any, model: type[BaseModel], what: str) -> tuple[str, str]:
    """One pydantic error as (field, message), in the words the Python API would use."""
    kind = error["type"]
    loc = [str(part) for part in error["loc"] if part != "body"]
    field = ".".join(loc) or "body"
    given = error.get("input")
    if kind == "json_invalid":
        return "body", f"is not valid JSON ({error.get('ctx', {}).get('error', 'unreadable')})"
    if not loc:
        return "body", f"must be a JSON object with the fields of a {what}, not {_json_type(given)}"
    if kind == "missing":
        return field, "is required"
    if kind == "extra_forbidden":
        if field == "amount" and what == "cancellation":
            return field, "a cancel has no amount (refunds go to POST /v1/refunds)"
        fields = ", ".join(model.model_fields)
        return field, f"is not a field of a {what}; its fields are: {fields}"
    if kind == "string_type":
        if given is None:
            return field, "is required (got null)"
        if loc[0] in ("amount", "original_amount") and _json_type(given) == "a number":
            return field, (
                f'must be a JSON string (like "50.00"), not the number {given}: a JSON number '
                "may be read as a binary float, and a float cannot hold money exactly"
            )
        return field, f"must be a string, not {_json_type(given)}"
    if kind == "dict_type":
        return field, f"must be an object of name: string pairs, not {_json_type(given)}"
    return field, str(error.get("msg", "is not valid"))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _scoped_key(caller: ApiKey, idempotency_key: str) -> str:
    if not _PRINTABLE.fullmatch(idempotency_key) or idempotency_key != idempotency_key.strip():
        raise _invalid(
            "Idempotency-Key",
            "must be printable ASCII, without control characters or surrounding spaces "
            "(a UUID is ideal)",
        )
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise _invalid(
            "Idempotency-Key",
            f"is {len(idempotency_key)} characters long; the limit is {MAX_IDEMPOTENCY_KEY}",
        )
    return f"{caller.name}/{idempotency_key}"


def _submit(kind: Kind, caller: ApiKey, idempotency_key: str, body: dict[str, Any]) -> JSONResponse:
    from worker.client import submit

    scoped = _scoped_key(caller, idempotency_key)
    extras = body.pop("extras")
    try:
        view, created = submit(kind, idempotency_key=scoped, extras=extras, **body)
    except IdempotencyConflict as exc:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"Idempotency-Key {idempotency_key!r} was already used for a different request "
            f"(job {exc.job_id}); use a new key for a new request, or repeat the original "
            "request exactly",
            idempotency_key=idempotency_key,
            job_id=exc.job_id,
        ) from None
    except InvalidRequest as exc:
        field = exc.field
        if field in extras:
            field = f"extras.{field}"
        elif field == "idempotency_key":
            field = "Idempotency-Key"
        raise _invalid(field, exc.message) from None
    headers = {"Location": f"/v1/jobs/{view.id}"}
    return JSONResponse(
        view.model_dump(mode="json"), status_code=202 if created else 200, headers=headers
    )


# ---- errors ----------------------------------------------------------------------------------


def _install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Headers and query parameters FastAPI checked (bodies are checked in `_parse`).
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        where, name = (loc[0], loc[-1]) if len(loc) >= 2 else ("request", "request")
        if first.get("type") == "missing":
            if where == "header" and name.lower() == "idempotency-key":
                message = (
                    "header is required: a key of your choosing, unique per request; repeating "
                    "a request with the same key returns the same job"
                )
                name = "Idempotency-Key"
            else:
                message = f"{where} parameter is required"
        else:
            said = str(first.get("msg", "is not valid"))
            message = f"{where} parameter: {said[:1].lower()}{said[1:]}"
        return JSONResponse(
            {"error": {"type": "invalid_request", "field": name, "message": message}},
            status_code=422,
        )

    @api.exception_handler(OperationalError)
    async def _database_down(_request: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse(
            {"error": {"type": "unavailable", "message": "the database cannot be reached"}},
            status_code=503,
            headers={"Retry-After": "5"},
        )


# ---- health ----------------------------------------------------------------------------------


def _check_database() -> str:
    from worker.db import get_engine

    try:
        with get_engine().connect() as connection:
            connection.execute(text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "down"; say which
        return f"down: {type(exc).__name__}"
    return "ok"


def _check_broker() -> str:
    from worker.app import app as celery_app

    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # noqa: BLE001
        return f"down: {type(exc).__name__}"
    return "ok"


def _configure() -> Any:
    from worker.logs import configure_logging

    configure_logging()
    return create_app()


app = _configure()
