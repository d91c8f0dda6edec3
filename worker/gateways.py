"""Providers as a process uses them: settings read once, one provider instance per gateway, one
shared `httpx.Client` (building a client costs ~50 ms of TLS setup, CELERY_NOTES.md: never per
task). Rebuilt after fork (`reset`)."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading

import httpx
from pydantic import ValidationError

import providers
from providers.base import GatewaySettings, Provider, ProviderNotConfigured
from providers.config import missing_variables
from worker.errors import ProviderUnavailable
from worker.logs import get_logger
from worker.settings import Settings, get_settings

_lock = threading.Lock()
_state: dict[str, object] = {"pid": os.getpid()}

# Below uvicorn's and most servers' keep-alive timeout (5 s): a connection the server has
# already closed is never reused for a refund, where "connection reset" would be ambiguous.
KEEPALIVE_EXPIRY_SECONDS = 2.0


def _fresh_process() -> None:
    """Drop what a parent process built (its sockets are not ours to use)."""
    if _state.get("pid") != os.getpid():
        _state.clear()
        _state["pid"] = os.getpid()


def reset() -> None:
    """Forget clients, providers and settings (after fork; in tests after changing env)."""
    with _lock:
        client = _state.get("client")
        if isinstance(client, httpx.Client) and _state.get("pid") == os.getpid():
            client.close()
        _state.clear()
        _state["pid"] = os.getpid()


def provider_class(provider_id: str) -> type[Provider]:
    try:
        return providers.provider_class(provider_id)
    except KeyError as exc:
        raise ProviderUnavailable("provider", str(exc.args[0])) from None


def provider_settings(provider_id: str) -> GatewaySettings:
    """The provider's settings, or `ProviderUnavailable` naming the missing variables."""
    cls = provider_class(provider_id)
    key = f"settings:{provider_id}"
    with _lock:
        _fresh_process()
        cached = _state.get(key)
        if isinstance(cached, GatewaySettings):
            return cached
        try:
            settings = cls.settings_class()
        except ValidationError as exc:
            missing = missing_variables(cls.settings_class, exc)
            if missing:
                error = ProviderNotConfigured(provider_id, missing)
                raise ProviderUnavailable("provider", str(error)) from None
            raise ProviderUnavailable(
                "provider", f"provider {provider_id!r} is misconfigured: {_summary(exc)}"
            ) from None
        _state[key] = settings
        return settings


def _summary(exc: ValidationError) -> str:
    # Never echo input values: they may be secrets.
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False)
    )


def http_client(settings: Settings | None = None) -> httpx.Client:
    settings = settings or get_settings()
    with _lock:
        _fresh_process()
        client = _state.get("client")
        if isinstance(client, httpx.Client):
            return client
        client = new_http_client(settings)
        _state["client"] = client
        return client


def new_http_client(settings: Settings) -> httpx.Client:
    """The HTTP client every gateway call goes through (one per process: `http_client`).
    The benchmark's bare-Celery baseline builds its own with this too, so both make the same
    calls the same way."""
    return httpx.Client(
        timeout=httpx.Timeout(
            settings.http_timeout_seconds, connect=settings.http_connect_timeout_seconds
        ),
        limits=httpx.Limits(
            max_connections=50,
            max_keepalive_connections=20,
            keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
        ),
        follow_redirects=False,
        headers={"User-Agent": "refundq"},
    )


def get_provider(provider_id: str) -> Provider:
    """This process's provider instance (it may cache tokens: one per process, shared)."""
    settings = provider_settings(provider_id)
    client = http_client()
    key = f"provider:{provider_id}"
    with _lock:
        cached = _state.get(key)
        if isinstance(cached, Provider):
            return cached
        provider = provider_class(provider_id)(settings, client)
        _state[key] = provider
        return provider


def built_provider(provider_id: str) -> Provider | None:
    """This process's provider instance if it is built already, else None (never builds: the
    claim's transaction asks, and must not wait for a TLS setup)."""
    with _lock:
        _fresh_process()
        cached = _state.get(f"provider:{provider_id}")
    return cached if isinstance(cached, Provider) else None


def warm() -> None:
    """Build the HTTP client and every configured provider now, at process start (Celery's
    `worker_process_init`), rather than in a first job's turn: the client's TLS setup alone
    takes ~40 ms. Unconfigured providers are skipped, and one that fails to build (a bad key)
    is logged and left to fail each of its jobs' turns, as it would without this."""
    http_client()
    for provider_id in providers.provider_ids():
        try:
            get_provider(provider_id)
        except ProviderUnavailable:
            continue
        except Exception:  # noqa: BLE001 - logged; the job's own turn meets it again
            get_logger("refundq.gateways").exception("provider.build_failed", provider=provider_id)


def callback_url(provider_id: str, job_id: str, settings: Settings | None = None) -> str | None:
    """The per-job callback URL for gateways that call back (vaultspay), or None.

    `{<PROVIDER>_CALLBACK_BASE_URL}/webhooks/<provider>/<job id>.<hmac>`: the token proves the
    URL came from us (the gateway does not sign its callbacks) and names the job.
    """
    settings = settings or get_settings()
    base = getattr(provider_settings(provider_id), "callback_base_url", None)
    if not base or settings.webhook_secret is None:
        return None
    return f"{str(base).rstrip('/')}/webhooks/{provider_id}/{callback_token(job_id, settings)}"


def callback_token(job_id: str, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    assert settings.webhook_secret is not None, "callback tokens need REFUNDQ_WEBHOOK_SECRET"
    mac = hmac.new(
        settings.webhook_secret.get_secret_value().encode(), job_id.encode(), hashlib.sha256
    ).hexdigest()[:32]
    return f"{job_id}.{mac}"


def job_from_callback_token(token: str, settings: Settings | None = None) -> str | None:
    """The job id a callback token was issued for, or None if it is not ours."""
    settings = settings or get_settings()
    job_id, _, _mac = token.partition(".")
    if settings.webhook_secret is None or not job_id:
        return None
    # Bytes, not str: compare_digest refuses non-ASCII text (a hostile URL can carry any).
    expected = callback_token(job_id, settings).encode()
    return job_id if hmac.compare_digest(expected, token.encode("utf-8", "replace")) else None
