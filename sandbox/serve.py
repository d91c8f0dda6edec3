"""Serving the sandbox: in the foreground (`run`, `python -m sandbox`), in a background thread
for tests (`start_in_thread`), and the `REFUNDQ_*` lines that point a worker at it."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from sandbox.app import create_app
from sandbox.config import SandboxConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8099
# Longer than the 5 s httpx keeps idle connections, so a client rarely reuses a connection the
# server is closing at that very moment (which would look like a gateway fault that is not one).
KEEP_ALIVE_SECONDS = 10
TRUNCATION_LOG_MESSAGE = "ASGI callable returned without completing response."


class _IntentionalTruncationFilter(logging.Filter):
    """uvicorn logs an error whenever an app leaves a response unfinished; in the sandbox that is
    the `drop`/`apply_then_drop` fault working as designed, and at hundreds of faults a second
    the noise would bury real errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != TRUNCATION_LOG_MESSAGE


def _uvicorn_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        access_log=False,
        log_level="warning",
    )
    # uvicorn.Config configures logging when it is built; the filter goes on afterwards so that
    # configuration cannot drop it.
    logging.getLogger("uvicorn.error").addFilter(_IntentionalTruncationFilter())
    return config


def run(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, config: SandboxConfig | None = None
) -> None:
    """Serve the sandbox in the foreground until interrupted."""
    uvicorn.Server(_uvicorn_config(create_app(config), host, port)).run()


@dataclass
class RunningSandbox:
    """A sandbox served by uvicorn in a daemon thread; `stop()` (or leaving the `with`) ends it."""

    base_url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"sandbox at {self.base_url} did not stop within {timeout} s")

    def __enter__(self) -> RunningSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(
    config: SandboxConfig | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    startup_timeout: float = 10.0,
) -> RunningSandbox:
    """Start a sandbox on `host:port` (0: a free port) and return once it accepts connections.

    The listening socket is bound here and handed to uvicorn, so the port is known before the
    server starts and no other process can take it in between.
    """
    app = create_app(config)
    # IPPROTO_TCP explicitly: asyncio enables TCP_NODELAY only on sockets whose `proto` says TCP,
    # and accepted sockets inherit it. With proto 0, Nagle's algorithm and delayed ACKs add
    # ~40 ms to every response.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    bound_port = listener.getsockname()[1]
    server = uvicorn.Server(_uvicorn_config(app, host, bound_port))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name="sandbox", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not _accepts_connections(host, bound_port) or not server.started:
        if not thread.is_alive():
            raise RuntimeError("sandbox server thread exited during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"sandbox did not accept connections within {startup_timeout} s")
        time.sleep(0.01)
    return RunningSandbox(f"http://{host}:{bound_port}", app, server, thread)


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def env_lines(
    base_url: str,
    config: SandboxConfig | None = None,
    bbmsl_private_key_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The `REFUNDQ_*` settings a worker needs to use this sandbox as all four gateways.

    The sandbox never holds the bbmsl private key, so its path comes from the caller (see
    `sandbox.keys.generate_bbmsl_keypair`); without one the bbmsl key line is left out.
    """
    config = config or SandboxConfig()
    base = base_url.rstrip("/")
    lines = [
        f"REFUNDQ_VAI247_BASE_URL={base}",
        f"REFUNDQ_VAI247_APP_ID={config.vai247_app_id}",
        f"REFUNDQ_VAI247_API_KEY={config.vai247_api_key.get_secret_value()}",
        f"REFUNDQ_BBMSL_BASE_URL={base}",
        f"REFUNDQ_BBMSL_MERCHANT_ID={config.bbmsl_merchant_id}",
    ]
    if bbmsl_private_key_path is not None:
        lines.append(f"REFUNDQ_BBMSL_PRIVATE_KEY_FILE={os.fspath(bbmsl_private_key_path)}")
    lines += [
        f"REFUNDQ_VAULTSPAY_BASE_URL={base}",
        f"REFUNDQ_VAULTSPAY_CLIENT_ID={config.vaultspay_client_id}",
        f"REFUNDQ_VAULTSPAY_CLIENT_SECRET={config.vaultspay_client_secret.get_secret_value()}",
        f"REFUNDQ_PGV2_BASE_URL={base}",
        f"REFUNDQ_PGV2_APP_ID={config.pgv2_app_id}",
        f"REFUNDQ_PGV2_APP_SECRET={config.pgv2_app_secret.get_secret_value()}",
    ]
    return lines
