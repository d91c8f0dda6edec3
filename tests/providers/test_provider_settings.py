"""Settings and registry of bbmsl, vaultspay and pgv2: missing variables are named as operators
set them, and secrets never print."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from providers import provider_class, provider_ids
from providers.base import Kind
from providers.bbmsl import BbmslProvider, BbmslSettings
from providers.config import missing_variables
from providers.pgv2 import Pgv2Provider, Pgv2Settings
from providers.vai247 import Vai247Settings
from providers.vaultspay import VaultspayProvider, VaultspaySettings
from tests.providers.conftest import PGV2_APP_SECRET, VAULTSPAY_CLIENT_SECRET

PEM_MARKER = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDmarker"


def load_error(settings_class: type) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        settings_class()
    return caught.value


@pytest.mark.parametrize(
    ("settings_class", "expected"),
    [
        (
            BbmslSettings,
            [
                "REFUNDQ_BBMSL_BASE_URL",
                "REFUNDQ_BBMSL_MERCHANT_ID",
                "REFUNDQ_BBMSL_PRIVATE_KEY_FILE",
            ],
        ),
        (
            VaultspaySettings,
            [
                "REFUNDQ_VAULTSPAY_BASE_URL",
                "REFUNDQ_VAULTSPAY_CLIENT_ID",
                "REFUNDQ_VAULTSPAY_CLIENT_SECRET",
            ],
        ),
        (Pgv2Settings, ["REFUNDQ_PGV2_BASE_URL", "REFUNDQ_PGV2_APP_ID", "REFUNDQ_PGV2_APP_SECRET"]),
    ],
)
def test_missing_settings_are_reported_with_their_environment_names(
    settings_class: type, expected: list[str]
) -> None:
    assert missing_variables(settings_class, load_error(settings_class)) == expected


def test_vai247_missing_names_are_unchanged_by_the_file_hint() -> None:
    names = missing_variables(Vai247Settings, load_error(Vai247Settings))
    assert names == ["REFUNDQ_VAI247_BASE_URL", "REFUNDQ_VAI247_APP_ID", "REFUNDQ_VAI247_API_KEY"]


def test_bbmsl_private_key_is_read_from_the_file_named_by_private_key_file(
    monkeypatch: pytest.MonkeyPatch, bbmsl_key_file: Path
) -> None:
    monkeypatch.setenv("REFUNDQ_BBMSL_BASE_URL", "https://bbmsl.test")
    monkeypatch.setenv("REFUNDQ_BBMSL_MERCHANT_ID", "3")
    monkeypatch.setenv("REFUNDQ_BBMSL_PRIVATE_KEY_FILE", str(bbmsl_key_file))
    settings = BbmslSettings()  # type: ignore[call-arg]  # from the environment

    assert settings.private_key.get_secret_value().startswith("-----BEGIN PRIVATE KEY-----")
    assert "BEGIN" not in repr(settings) and "BEGIN" not in str(settings)


def test_bbmsl_file_that_is_not_a_private_key_is_named_without_echoing_its_content(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bad = tmp_path / "key.pem"
    bad.write_text(f"-----BEGIN PRIVATE KEY-----\n{PEM_MARKER}\n-----END PRIVATE KEY-----\n")
    monkeypatch.setenv("REFUNDQ_BBMSL_BASE_URL", "https://bbmsl.test")
    monkeypatch.setenv("REFUNDQ_BBMSL_MERCHANT_ID", "3")
    monkeypatch.setenv("REFUNDQ_BBMSL_PRIVATE_KEY_FILE", str(bad))

    error = load_error(BbmslSettings)
    assert "REFUNDQ_BBMSL_PRIVATE_KEY_FILE" in str(error)
    assert PEM_MARKER not in str(error)
    assert missing_variables(BbmslSettings, error) == []


def test_bbmsl_non_rsa_key_is_refused_because_bbmsl_signs_with_rsa(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    monkeypatch.setenv("REFUNDQ_BBMSL_BASE_URL", "https://bbmsl.test")
    monkeypatch.setenv("REFUNDQ_BBMSL_MERCHANT_ID", "3")
    monkeypatch.setenv("REFUNDQ_BBMSL_PRIVATE_KEY_FILE", str(path))
    assert "RSA" in str(load_error(BbmslSettings))


def test_bbmsl_merchant_id_must_be_a_number(
    monkeypatch: pytest.MonkeyPatch, bbmsl_key_file: Path
) -> None:
    monkeypatch.setenv("REFUNDQ_BBMSL_BASE_URL", "https://bbmsl.test")
    monkeypatch.setenv("REFUNDQ_BBMSL_MERCHANT_ID", "M-3")
    monkeypatch.setenv("REFUNDQ_BBMSL_PRIVATE_KEY_FILE", str(bbmsl_key_file))
    assert "merchant_id" in str(load_error(BbmslSettings))


@pytest.mark.parametrize(
    ("settings_class", "secret_variable", "secret"),
    [
        (VaultspaySettings, "REFUNDQ_VAULTSPAY_CLIENT_SECRET", VAULTSPAY_CLIENT_SECRET),
        (Pgv2Settings, "REFUNDQ_PGV2_APP_SECRET", PGV2_APP_SECRET),
        (BbmslSettings, "REFUNDQ_BBMSL_PRIVATE_KEY", PEM_MARKER),
    ],
)
def test_secret_is_not_echoed_when_another_setting_is_missing(
    monkeypatch: pytest.MonkeyPatch, settings_class: type, secret_variable: str, secret: str
) -> None:
    monkeypatch.setenv(secret_variable, secret)
    error = load_error(settings_class)
    assert secret not in str(error)
    assert secret not in repr(error)


def test_secrets_never_appear_in_settings_repr(
    bbmsl_settings: BbmslSettings,
    vaultspay_settings: VaultspaySettings,
    pgv2_settings: Pgv2Settings,
) -> None:
    for settings, secret in (
        (vaultspay_settings, VAULTSPAY_CLIENT_SECRET),
        (pgv2_settings, PGV2_APP_SECRET),
        (bbmsl_settings, bbmsl_settings.private_key.get_secret_value()),
    ):
        assert secret not in repr(settings)
        assert secret not in str(settings)
        assert secret not in repr(settings.model_dump())


def test_vaultspay_callback_base_url_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFUNDQ_VAULTSPAY_BASE_URL", "https://vaultspay.test")
    monkeypatch.setenv("REFUNDQ_VAULTSPAY_CLIENT_ID", "id")
    monkeypatch.setenv("REFUNDQ_VAULTSPAY_CLIENT_SECRET_FILE", str(_secret_file()))
    settings = VaultspaySettings()  # type: ignore[call-arg]  # from the environment
    assert settings.callback_base_url is None
    assert settings.client_secret.get_secret_value() == "from-a-file"


def _secret_file() -> Path:
    path = Path("client_secret.txt")  # the test's own working directory (isolated_environment)
    path.write_text("from-a-file\n")
    return path.resolve()


# ---- registry and capabilities ----


@pytest.mark.parametrize(
    ("provider_id", "cls"),
    [("bbmsl", BbmslProvider), ("vaultspay", VaultspayProvider), ("pgv2", Pgv2Provider)],
)
def test_registry_resolves_the_new_providers(provider_id: str, cls: type) -> None:
    assert provider_id in provider_ids()
    assert provider_class(provider_id) is cls
    assert cls.name == provider_id
    assert cls.capabilities.kinds == frozenset({Kind.REFUND})


def test_capabilities_state_what_each_gateway_guarantees() -> None:
    bbmsl, vaultspay, pgv2 = (
        BbmslProvider.capabilities,
        VaultspayProvider.capabilities,
        Pgv2Provider.capabilities,
    )
    assert (bbmsl.status_query, bbmsl.status_by_own_reference, bbmsl.resend_safe) == (
        True,
        True,
        True,
    )
    assert bbmsl.single_refund_per_payment and not bbmsl.settles_async
    assert (vaultspay.status_query, vaultspay.status_by_own_reference) == (True, False)
    assert not vaultspay.resend_safe and vaultspay.settles_async
    assert (pgv2.status_query, pgv2.status_by_own_reference, pgv2.resend_safe) == (True, True, True)
    assert not pgv2.settles_async and not pgv2.single_refund_per_payment
    assert set(BbmslProvider.extra_fields) == {"order_id"}
    assert set(VaultspayProvider.extra_fields) == {"partial"}
    assert Pgv2Provider.extra_fields == {}
