"""Admin API, configuration, keys, serving, and the sandbox's independence from the product."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox.config import SandboxConfig
from sandbox.keys import generate_bbmsl_keypair
from sandbox.serve import env_lines, start_in_thread
from tests.sandbox.gateway_kit import (
    PGV2_REFUND,
    VAI247_REFUND,
    Admin,
    pgv2_post,
    vai247_post,
    vaultspay_token,
    wait_until,
)
from tests.support.services import free_port

SANDBOX_DIR = Path(__file__).resolve().parents[2] / "sandbox"


def test_payments_are_created_with_gateway_defaults(client: httpx.Client, admin: Admin) -> None:
    vai = admin.payment("vai247", "ord_1", "100.00")
    bbmsl = admin.payment("bbmsl", "shop-1", "15.00", currency="USD")
    pgv2 = admin.payment("pgv2", "PAY-1", "9.99")

    assert (vai["status"], vai["currency"], vai["amount"]) == ("completed", "HKD", "100.00")
    assert (bbmsl["status"], bbmsl["currency"], bbmsl["net_amount"]) == ("SUCCESS", "USD", "15.00")
    assert isinstance(bbmsl["order_id"], int)
    assert (pgv2["status"], pgv2["currency"], pgv2["refunded_amount"]) == ("ok", "INR", "0.00")
    assert admin.get_payment("pgv2", "PAY-1") == pgv2


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/_admin/nope/payments", {"payment_ref": "x", "amount": "1.00"}, 404),
        ("/_admin/vai247/payments", {"payment_ref": "x", "amount": "0"}, 422),
        ("/_admin/vai247/payments", {"payment_ref": "x", "amount": "1.001"}, 422),
        ("/_admin/vai247/payments", {"payment_ref": "x", "amount": "1", "status": "odd"}, 422),
        ("/_admin/bbmsl/payments", {"payment_ref": "x", "amount": "1", "status": "pending"}, 422),
        ("/_admin/vai247/payments", {"payment_ref": "", "amount": "1.00"}, 422),
    ],
)
def test_bad_payment_requests_are_refused(
    client: httpx.Client, path: str, body: dict[str, str], expected: int
) -> None:
    assert client.post(path, json=body).status_code == expected


def test_duplicate_payment_is_409_and_unknown_is_404(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vai247", "ord_1", "100.00")
    again = client.post("/_admin/vai247/payments", json={"payment_ref": "ord_1", "amount": "1"})
    assert again.status_code == 409
    assert client.get("/_admin/vai247/payments/ord_2").status_code == 404


def test_ledger_and_calls_filter(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vai247", "ord_1", "100.00")
    admin.payment("vai247", "ord_2", "100.00")
    admin.payment("pgv2", "PAY-1", "100.00")
    vai247_post(client, VAI247_REFUND, '{"order_id":"ord_1","amount":1}')
    vai247_post(client, VAI247_REFUND, '{"order_id":"ord_2","amount":2}')
    pgv2_post(
        client,
        PGV2_REFUND,
        {"merchantRefundNo": "R1", "paymentNo": "PAY-1", "amount": "3.00", "description": "d"},
    )

    assert len(admin.ledger()) == 3
    assert [entry["amount"] for entry in admin.ledger(gateway="vai247")] == ["1", "2"]
    assert [entry["amount"] for entry in admin.ledger(payment_ref="ord_2")] == ["2"]
    assert len(admin.calls(gateway="vai247", endpoint="refund")) == 2
    assert [call["payment_ref"] for call in admin.calls(key="R1")] == ["PAY-1"]
    assert admin.calls(gateway="pgv2", endpoint="query") == []


def test_reset_forgets_everything_but_configuration(client: httpx.Client, admin: Admin) -> None:
    admin.payment("vaultspay", "PL_1", "100.00")
    token = vaultspay_token(client)
    admin.fault(gateway="vai247", endpoint="refund", kind="error")
    client.post("/_admin/pgv2/settings", json={"duplicate_mode": "refuse"})

    client.post("/_admin/reset").raise_for_status()

    assert client.get("/_admin/vaultspay/payments/PL_1").status_code == 404
    assert admin.ledger() == [] and admin.calls() == [] and admin.faults() == []
    refused = client.post(
        "/public/external/v1/get-refund-request",
        json={"uuid": "x"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert refused.status_code == 401  # tokens are gone
    # Settings changed through the admin API stay until a reset that restores them.
    assert client.get("/_admin/pgv2/settings").json()["duplicate_mode"] == "refuse"
    client.post("/_admin/reset", json={"restore_settings": True})
    assert client.get("/_admin/pgv2/settings").json()["duplicate_mode"] == "replay"


def test_reset_forgets_pgv2_nonces(client: httpx.Client, admin: Admin) -> None:
    admin.payment("pgv2", "PAY-1", "100.00")
    body = {"merchantRefundNo": "R1", "paymentNo": "PAY-1", "amount": "3.00", "description": "d"}
    nonce = "0123456789abcdef0123456789abcdef"
    assert pgv2_post(client, PGV2_REFUND, body, nonce=nonce).json()["code"] == "OK"
    client.post("/_admin/reset")
    admin.payment("pgv2", "PAY-1", "100.00")
    assert pgv2_post(client, PGV2_REFUND, body, nonce=nonce).json()["code"] == "OK"


def test_generated_bbmsl_keys_are_pkcs8_and_spki(tmp_path: Path) -> None:
    private_path, public_path = generate_bbmsl_keypair(tmp_path / "keys")

    private_pem = private_path.read_bytes()
    public_pem = public_path.read_bytes()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not "RSA PRIVATE"
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    private_key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(private_key, rsa.RSAPrivateKey)
    assert private_key.key_size == 2048
    public_key = serialization.load_pem_public_key(public_pem)
    assert isinstance(public_key, rsa.RSAPublicKey)
    assert private_key.public_key().public_numbers() == public_key.public_numbers()


def test_env_lines_point_a_worker_at_the_sandbox() -> None:
    config = SandboxConfig(_env_file=None, vai247_app_id="app-7")  # type: ignore[call-arg]

    lines = env_lines("http://127.0.0.1:8099/", config, Path("/keys/bbmsl_private.pem"))

    settings = dict(line.split("=", 1) for line in lines)
    assert settings == {
        "REFUNDQ_VAI247_BASE_URL": "http://127.0.0.1:8099",
        "REFUNDQ_VAI247_APP_ID": "app-7",
        "REFUNDQ_VAI247_API_KEY": "sandbox-key",
        "REFUNDQ_BBMSL_BASE_URL": "http://127.0.0.1:8099",
        "REFUNDQ_BBMSL_MERCHANT_ID": "3",
        "REFUNDQ_BBMSL_PRIVATE_KEY_FILE": "/keys/bbmsl_private.pem",
        "REFUNDQ_VAULTSPAY_BASE_URL": "http://127.0.0.1:8099",
        "REFUNDQ_VAULTSPAY_CLIENT_ID": "sandbox-client",
        "REFUNDQ_VAULTSPAY_CLIENT_SECRET": "sandbox-secret",
        "REFUNDQ_PGV2_BASE_URL": "http://127.0.0.1:8099",
        "REFUNDQ_PGV2_APP_ID": "sandbox-pgv2-app",
        "REFUNDQ_PGV2_APP_SECRET": "sandbox-pgv2-secret",
    }


def test_config_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, public_path = generate_bbmsl_keypair(tmp_path)
    monkeypatch.setenv("REFUNDQ_SANDBOX_PGV2_DUPLICATE_MODE", "refuse")
    monkeypatch.setenv("REFUNDQ_SANDBOX_VAULTSPAY_TOKEN_TTL_SECONDS", "60")
    monkeypatch.setenv("REFUNDQ_SANDBOX_BBMSL_PUBLIC_KEY_FILE", str(public_path))

    config = SandboxConfig(_env_file=None)  # type: ignore[call-arg]

    assert config.pgv2_duplicate_mode == "refuse"
    assert config.vaultspay_token_ttl_seconds == 60
    assert config.bbmsl_public_key == public_path.read_text()
    assert "sandbox-secret" not in repr(config)


def test_config_auto_advance_starts_requests_moving(admin: Admin) -> None:
    # A second, short-lived sandbox with auto-advance configured at startup.
    config = SandboxConfig(
        _env_file=None,  # type: ignore[call-arg]
        vaultspay_auto_advance_final_after_seconds=0.1,
        vaultspay_auto_advance_final_status=3,
    )
    with start_in_thread(config) as running, httpx.Client(base_url=running.base_url) as http:
        Admin(http).payment("vaultspay", "PL_1", "10.00")
        token = vaultspay_token(http)
        refund_uuid = http.post(
            "/public/external/v1/create-refund-request",
            json={"transactionId": "PL_1"},
            headers={"Authorization": f"Bearer {token}"},
        ).json()["data"]["uuid"]
        wait_until(
            lambda: (
                http.get(f"/_admin/vaultspay/refund-requests/{refund_uuid}").json()["status"] == 3
            )
        )


def test_python_dash_m_sandbox_serves_and_prints_env_lines(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandbox",
            "--port",
            str(port),
            "--bbmsl-keys-dir",
            str(tmp_path / "keys"),
        ],
        cwd=SANDBOX_DIR.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SANDBOX_DIR.parent)},
    )
    try:
        base_url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return httpx.get(f"{base_url}/_admin/faults", timeout=1).status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                return False

        wait_until(answers, timeout=20)
        with httpx.Client(base_url=base_url) as http:
            started = time.monotonic()
            for _ in range(20):
                http.get("/_admin/faults")
        # Sanity bound far above the ~2 ms per call seen locally; catches the ~40 ms Nagle trap.
        assert (time.monotonic() - started) / 20 < 0.03
        assert (tmp_path / "keys" / "bbmsl_public.pem").exists()
        # The printed lines carry the generated private key.
        merchant = httpx.get(f"{base_url}/_admin/bbmsl/merchant").json()
        assert merchant["has_public_key"] is True
    finally:
        process.terminate()
        stdout, _ = process.communicate(timeout=10)
    assert f"REFUNDQ_BBMSL_PRIVATE_KEY_FILE={tmp_path / 'keys' / 'bbmsl_private.pem'}" in stdout
    assert f"REFUNDQ_PGV2_BASE_URL=http://127.0.0.1:{port}" in stdout


def test_sandbox_never_imports_the_product() -> None:
    forbidden = {"worker", "tasks", "providers"}
    for path in SANDBOX_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
