"""refundq's HTTP side (FastAPI; `uvicorn worker.api:app`): health and gateway callbacks.

OpenAPI at `/openapi.json`. Runs in its own processes (`web` in the Procfile); it shares the
database and the broker with the workers and never talks to a gateway itself.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from worker.callbacks import CallbackRejected, receive_callback


def create_app() -> FastAPI:
    api = FastAPI(
        title="refundq",
        summary="Refunds and cancels that reach the payment gateway exactly once.",
        version="0.1.0",
    )

    @api.get("/healthz", tags=["operations"])
    def healthz() -> JSONResponse:
        """Whether the database and the broker answer; 503 names what is down."""
        checks = {"database": _check_database(), "broker": _check_broker()}
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse(checks, status_code=200 if healthy else 503)

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

    return api


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
