"""The gateway simulators, served by a real uvicorn on a free loopback port in a thread, and a
small client for their admin API (payments, ledger, call log, faults)."""

from __future__ import annotations

import subprocess
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.support.polling import wait_for
from tests.support.services import free_port


class SandboxServer:
    def __init__(self, keys_dir: Path) -> None:
        from sandbox.app import create_app
        from sandbox.config import SandboxConfig
        from sandbox.keys import generate_bbmsl_keypair

        self.private_key_path, public_key_path = generate_bbmsl_keypair(keys_dir)
        self.config = SandboxConfig(bbmsl_public_key=public_key_path.read_text())
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(self.config),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="sandbox", daemon=True)

    def start(self) -> None:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=15, message="sandbox to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def env(self) -> dict[str, str]:
        from sandbox.serve import env_lines

        lines = env_lines(self.base_url, self.config, self.private_key_path)
        return dict(line.split("=", 1) for line in lines)


class SandboxProcess:
    """The simulators as a process of their own (`python -m sandbox`), for runs that load them
    hard (chaos): they do not share the test process's interpreter. Configured through the
    `REFUNDQ_SANDBOX_*` environment (fault seed, vaultspay auto-advance, ...)."""

    def __init__(self, directory: Path, **config: str) -> None:
        from sandbox.keys import generate_bbmsl_keypair

        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.private_key_path, self.public_key_path = generate_bbmsl_keypair(directory)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config = dict(config)
        self.config_env = {f"REFUNDQ_SANDBOX_{k.upper()}": v for k, v in config.items()}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import os
        import sys

        from tests.support.stack import REPO, register_spawned

        log = (self.directory / "sandbox.log").open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sandbox",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--bbmsl-public-key-file",
                str(self.public_key_path),
            ],
            cwd=REPO,
            env={**os.environ, **self.config_env, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        register_spawned(self.process)

        def answers() -> bool:
            try:
                return httpx.get(self.base_url + "/_admin/faults", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout=30, message="the sandbox process to answer")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def env(self) -> dict[str, str]:
        from sandbox.config import SandboxConfig
        from sandbox.serve import env_lines

        lines = env_lines(self.base_url, SandboxConfig(**self.config), self.private_key_path)
        return dict(line.split("=", 1) for line in lines)

    def secrets(self) -> list[str]:
        """Every credential a worker holds for this sandbox (for leak checks)."""
        env = self.env()
        values = [
            env[name]
            for name in (
                "REFUNDQ_VAI247_API_KEY",
                "REFUNDQ_VAULTSPAY_CLIENT_SECRET",
                "REFUNDQ_PGV2_APP_SECRET",
            )
        ]
        body = self.private_key_path.read_text().splitlines()[1:-1]
        return values + [line for line in body if len(line) > 20]


class SandboxAdmin:
    """The sandbox's `/_admin` API, as the tests use it."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url + "/_admin", timeout=10)

    def _ok(self, response: httpx.Response) -> Any:
        if response.is_error:
            raise AssertionError(
                f"sandbox admin {response.request.method} {response.request.url} -> "
                f"{response.status_code}: {response.text}"
            )
        return response.json() if response.content else None

    def create_payment(
        self,
        gateway: str,
        payment_ref: str,
        amount: str | Decimal,
        currency: str,
        status: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "payment_ref": payment_ref,
            "amount": str(amount),
            "currency": currency,
        }
        if status is not None:
            body["status"] = status
        return dict(self._ok(self.http.post(f"/{gateway}/payments", json=body)))

    def payment(self, gateway: str, payment_ref: str) -> dict[str, Any]:
        return dict(self._ok(self.http.get(f"/{gateway}/payments/{payment_ref}")))

    def ledger(self, gateway: str | None = None, payment_ref: str | None = None) -> list[dict]:
        params = {k: v for k, v in {"gateway": gateway, "payment_ref": payment_ref}.items() if v}
        return list(self._ok(self.http.get("/ledger", params=params))["entries"])

    def calls(
        self, gateway: str | None = None, endpoint: str | None = None, key: str | None = None
    ) -> list[dict]:
        params = {
            k: v for k, v in {"gateway": gateway, "endpoint": endpoint, "key": key}.items() if v
        }
        return list(self._ok(self.http.get("/calls", params=params))["calls"])

    def fault(self, gateway: str, endpoint: str, kind: str, **options: Any) -> str:
        body = {"gateway": gateway, "endpoint": endpoint, "kind": kind, **options}
        return str(self._ok(self.http.post("/faults", json=body))["id"])

    def faults(self) -> list[dict]:
        return list(self._ok(self.http.get("/faults"))["faults"])

    def clear_faults(self) -> None:
        self._ok(self.http.delete("/faults"))

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._ok(self.http.post(path, json=body))

    def get(self, path: str) -> Any:
        return self._ok(self.http.get(path))
