"""A real sandbox under uvicorn on a loopback port, shared by the session and reset before each
test; plus a tiny HTTP receiver for vaultspay callbacks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox.config import SandboxConfig
from sandbox.keys import generate_bbmsl_keypair
from sandbox.serve import RunningSandbox, start_in_thread
from tests.sandbox.gateway_kit import Admin, CallbackReceiver, load_private_key


@pytest.fixture(scope="session")
def bbmsl_key_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_bbmsl_keypair(tmp_path_factory.mktemp("bbmsl-keys"))


@pytest.fixture(scope="session")
def bbmsl_private_key(bbmsl_key_paths: tuple[Path, Path]) -> rsa.RSAPrivateKey:
    return load_private_key(bbmsl_key_paths[0])


@pytest.fixture(scope="session")
def sandbox_config(bbmsl_key_paths: tuple[Path, Path]) -> SandboxConfig:
    # _env_file=None: a developer's .env must not change what the tests see. Settlement is
    # left to admin commands so that no test depends on wall-clock timing unless it says so.
    return SandboxConfig(
        _env_file=None,  # type: ignore[call-arg]
        bbmsl_public_key_file=bbmsl_key_paths[1],
        pgv2_settle_after_seconds=None,
        vaultspay_callback_timeout_seconds=2.0,
        fault_seed=7,
    )


@pytest.fixture(scope="session")
def simulator(sandbox_config: SandboxConfig) -> Iterator[RunningSandbox]:
    # start_in_thread polls until the port accepts connections (with a deadline).
    with start_in_thread(sandbox_config, startup_timeout=10.0) as running:
        yield running


@pytest.fixture
def client(simulator: RunningSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=simulator.base_url, timeout=10.0) as http:
        Admin(http).reset()
        yield http


@pytest.fixture
def admin(client: httpx.Client) -> Admin:
    return Admin(client)


@pytest.fixture
def callback_receiver() -> Iterator[CallbackReceiver]:
    receiver: CallbackReceiver | None = None

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            assert receiver is not None
            length = int(self.headers.get("content-length", "0"))
            raw = self.rfile.read(length)
            with receiver.lock:
                receiver.received.append(
                    {
                        "path": self.path,
                        "content_type": self.headers.get("content-type"),
                        "body": json.loads(raw),
                    }
                )
            self.send_response(receiver.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return  # keep test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = CallbackReceiver(
        url=f"http://127.0.0.1:{server.server_address[1]}/hook/secret-token"
    )
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
