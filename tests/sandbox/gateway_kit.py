"""Test-side clients of the sandbox, written by hand from the gateways' contracts.

Deliberately independent of `sandbox` (and of `providers`): if the sandbox's verification and
this signing agree, both follow the written contract rather than one shared helper.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

VAI247_REFUND = "/api/v1/payment-gateway/order/refund"
VAI247_CANCEL = "/api/v1/payment-gateway/order/cancel"
BBMSL_REFUND = "/hosted-checkout/refund"
BBMSL_QUERY = "/hosted-checkout/query"
VAULTSPAY_AUTH = "/public/external/v1/merchant-auth"
VAULTSPAY_CREATE = "/public/external/v1/create-refund-request"
VAULTSPAY_STATUS = "/public/external/v1/get-refund-request"
PGV2_REFUND = "/pg/v2/refund/create"
PGV2_QUERY = "/pg/v2/refund/query"

VAI247_APP_ID = "sandbox-app"
VAI247_API_KEY = "sandbox-key"
VAULTSPAY_CLIENT_ID = "sandbox-client"
VAULTSPAY_CLIENT_SECRET = "sandbox-secret"
PGV2_APP_ID = "sandbox-pgv2-app"
PGV2_APP_SECRET = "sandbox-pgv2-secret"


def wait_until(
    condition: Callable[[], Any], *, timeout: float = 5.0, interval: float = 0.02
) -> Any:
    """Poll until `condition()` is truthy and return it; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass
class CallbackReceiver:
    """Records every POST; answers `status` (settable)."""

    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [item["body"] for item in self.received]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.bodies()) >= count, timeout=timeout)
        return self.bodies()


# ---- admin ----


class Admin:
    """The `/_admin` API through an httpx client."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def reset(self) -> None:
        self.client.post("/_admin/reset", json={"restore_settings": True}).raise_for_status()

    def payment(self, gateway: str, payment_ref: str, amount: str, **extra: str) -> dict[str, Any]:
        response = self.client.post(
            f"/_admin/{gateway}/payments",
            json={"payment_ref": payment_ref, "amount": amount, **extra},
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    def get_payment(self, gateway: str, payment_ref: str) -> dict[str, Any]:
        response = self.client.get(f"/_admin/{gateway}/payments/{payment_ref}")
        response.raise_for_status()
        return dict(response.json())

    def ledger(self, **filters: str) -> list[dict[str, Any]]:
        response = self.client.get("/_admin/ledger", params=filters)
        response.raise_for_status()
        return list(response.json()["entries"])

    def calls(self, **filters: str) -> list[dict[str, Any]]:
        response = self.client.get("/_admin/calls", params=filters)
        response.raise_for_status()
        body = response.json()
        assert body["count"] == len(body["calls"])
        return list(body["calls"])

    def fault(self, **rule: Any) -> dict[str, Any]:
        response = self.client.post("/_admin/faults", json=rule)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def faults(self) -> list[dict[str, Any]]:
        return list(self.client.get("/_admin/faults").json()["faults"])


# ---- vai247 ----


def vai247_headers(
    *,
    app_id: str = VAI247_APP_ID,
    api_key: str = VAI247_API_KEY,
    timestamp: int | None = None,
) -> dict[str, str]:
    return {
        "X-App-Id": app_id,
        "X-Api-Key": api_key,
        "X-Timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "Content-Type": "application/json",
    }


def vai247_post(
    client: httpx.Client, path: str, body: str, **header_overrides: Any
) -> httpx.Response:
    """POST a literal JSON text, so amounts are exactly the numbers a test writes."""
    return client.post(path, content=body.encode(), headers=vai247_headers(**header_overrides))


# ---- bbmsl ----


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def bbmsl_envelope(private_key: rsa.RSAPrivateKey, request_text: str) -> dict[str, str]:
    """`{"request", "signature"}` with SHA256withRSA (PKCS#1 v1.5) over the exact text."""
    signature = private_key.sign(request_text.encode(), padding.PKCS1v15(), hashes.SHA256())
    return {"request": request_text, "signature": base64.b64encode(signature).decode()}


def bbmsl_post(
    client: httpx.Client, path: str, private_key: rsa.RSAPrivateKey, request_text: str
) -> dict[str, Any]:
    response = client.post(path, json=bbmsl_envelope(private_key, request_text))
    assert response.status_code == 200, response.text
    return dict(json.loads(response.content))


# ---- vaultspay ----


def vaultspay_token(client: httpx.Client) -> str:
    response = client.post(
        VAULTSPAY_AUTH,
        json={"clientId": VAULTSPAY_CLIENT_ID, "clientSecret": VAULTSPAY_CLIENT_SECRET},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- pgv2 ----


def pgv2_string_to_sign(
    *, method: str, url: str, timestamp: str, nonce: str, body: bytes, app_secret: str
) -> bytes:
    lines = [PGV2_APP_ID, app_secret, method, url, timestamp, nonce]
    return "".join(f"{line}\n" for line in lines).encode() + body + b"\n"


def pgv2_sign(
    *,
    method: str,
    url: str,
    timestamp: str,
    nonce: str,
    body: bytes,
    app_secret: str = PGV2_APP_SECRET,
) -> str:
    message = pgv2_string_to_sign(
        method=method, url=url, timestamp=timestamp, nonce=nonce, body=body, app_secret=app_secret
    )
    return hashlib.sha256(message).hexdigest()


def pgv2_authorization(
    url: str,
    body: bytes,
    *,
    timestamp: str | None = None,
    nonce: str | None = None,
    app_id: str = PGV2_APP_ID,
    app_secret: str = PGV2_APP_SECRET,
) -> str:
    timestamp = timestamp or str(time.time_ns() // 1_000_000)
    nonce = nonce or secrets.token_hex(16)
    sign = pgv2_sign(
        method="POST", url=url, timestamp=timestamp, nonce=nonce, body=body, app_secret=app_secret
    )
    return f"V2_SHA256 appId={app_id},sign={sign},timestamp={timestamp},nonce={nonce}"


def pgv2_post(
    client: httpx.Client, path: str, payload: dict[str, Any], **auth: Any
) -> httpx.Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    url = f"{client.base_url}".rstrip("/") + path
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": pgv2_authorization(url, body, **auth),
    }
    return client.post(path, content=body, headers=headers)


def pgv2_response_signature_ok(response: httpx.Response) -> bool:
    """Recompute the response sign: the request's method and URL, the response's own timestamp
    and nonce, the response body bytes."""
    header = response.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme != "V2_SHA256":
        return False
    fields = dict(item.split("=", 1) for item in credentials.split(","))
    if fields.get("appId") != PGV2_APP_ID or len(fields.get("nonce", "")) != 32:
        return False
    expected = pgv2_sign(
        method=response.request.method,
        url=str(response.request.url),
        timestamp=fields["timestamp"],
        nonce=fields["nonce"],
        body=response.content,
    )
    return fields.get("sign") == expected
