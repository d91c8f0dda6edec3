"""Fixtures for the offline provider tests: isolated settings and generated keys."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from providers.bbmsl import BbmslSettings
from providers.pgv2 import Pgv2Settings
from providers.vaultspay import VaultspaySettings

BBMSL_BASE_URL = "https://bbmsl.test"
VAULTSPAY_BASE_URL = "https://vaultspay.test"
PGV2_BASE_URL = "https://pgv2.test"
VAULTSPAY_CLIENT_SECRET = "vp-client-secret-do-not-print"
PGV2_APP_ID = "1111b620f93b48c5904210ff47bb1111"
PGV2_APP_SECRET = "pgv2-app-secret-do-not-print"


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No REFUNDQ_* variable or .env file of the developer's leaks into a test."""
    for name in list(os.environ):
        if name.startswith("REFUNDQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def bbmsl_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def bbmsl_key_file(tmp_path: Path, bbmsl_private_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "bbmsl_private.pem"
    path.write_bytes(
        bbmsl_private_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture
def bbmsl_settings(monkeypatch: pytest.MonkeyPatch, bbmsl_key_file: Path) -> BbmslSettings:
    """Loaded the way operators configure it: the key through REFUNDQ_BBMSL_PRIVATE_KEY_FILE."""
    monkeypatch.setenv("REFUNDQ_BBMSL_BASE_URL", BBMSL_BASE_URL)
    monkeypatch.setenv("REFUNDQ_BBMSL_MERCHANT_ID", "3")
    monkeypatch.setenv("REFUNDQ_BBMSL_PRIVATE_KEY_FILE", str(bbmsl_key_file))
    return BbmslSettings()  # type: ignore[call-arg]  # from the environment


@pytest.fixture
def vaultspay_settings() -> VaultspaySettings:
    return VaultspaySettings(
        base_url=VAULTSPAY_BASE_URL,
        client_id="vp-client",
        client_secret=SecretStr(VAULTSPAY_CLIENT_SECRET),
    )


@pytest.fixture
def pgv2_settings() -> Pgv2Settings:
    return Pgv2Settings(
        base_url=PGV2_BASE_URL, app_id=PGV2_APP_ID, app_secret=SecretStr(PGV2_APP_SECRET)
    )
