"""Sandbox settings: `REFUNDQ_SANDBOX_<FIELD>` from the environment (or a `.env` file).

Every default works out of the box, so `python -m sandbox` needs no configuration; the worker is
pointed at it with the lines `sandbox.serve.env_lines` prints. Secrets are `SecretStr` even here,
so a settings object that ends up in a log line does not print them.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DuplicateMode = Literal["replay", "refuse"]
# An int in {2, 3, 4}: a `Literal[2, 3, 4]` would refuse "2", which is what an environment
# variable delivers.
VaultspayFinalStatus = Annotated[int, Field(ge=2, le=4)]


class SandboxConfig(BaseSettings):
    """Credentials the simulated gateways accept and the knobs of their behaviour."""

    model_config = SettingsConfigDict(
        env_prefix="REFUNDQ_SANDBOX_",
        env_file=".env",
        extra="ignore",
        # `REFUNDQ_SANDBOX_PGV2_SETTLE_AFTER_SECONDS=none`: settle only on an admin command.
        env_parse_none_str="none",
    )

    # vai247: static headers, no signature.
    vai247_app_id: str = "sandbox-app"
    vai247_api_key: SecretStr = SecretStr("sandbox-key")
    vai247_timestamp_skew_seconds: float = Field(default=300.0, gt=0)

    # bbmsl: the merchant's RSA public key (PEM, SubjectPublicKeyInfo). Without one every signed
    # request fails with 1001, as the real gateway would before keys are exchanged.
    bbmsl_merchant_id: str = "3"
    bbmsl_public_key: str | None = None
    bbmsl_public_key_file: Path | None = None
    bbmsl_unsettled_balance: Decimal = Field(default=Decimal("1000000000.00"), ge=0)

    # vaultspay: client credentials for merchant-auth and the lifetime of the tokens it issues.
    vaultspay_client_id: str = "sandbox-client"
    vaultspay_client_secret: SecretStr = SecretStr("sandbox-secret")
    vaultspay_token_ttl_seconds: int = Field(default=3600, ge=0)
    # Auto-advance is off unless `final_after` is set; both delays count from the request's
    # creation. Without `initiated_after` a request jumps from 0 straight to its final status.
    vaultspay_auto_advance_initiated_after_seconds: float | None = Field(default=None, ge=0)
    vaultspay_auto_advance_final_after_seconds: float | None = Field(default=None, ge=0)
    vaultspay_auto_advance_final_status: VaultspayFinalStatus = 2
    vaultspay_callback_timeout_seconds: float = Field(default=5.0, gt=0)

    # pgv2: V2_SHA256 credentials, what a repeated merchantRefundNo gets, and when a refund
    # settles (None: only on an admin command).
    pgv2_app_id: str = "sandbox-pgv2-app"
    pgv2_app_secret: SecretStr = SecretStr("sandbox-pgv2-secret")
    pgv2_duplicate_mode: DuplicateMode = "replay"
    pgv2_settle_after_seconds: float | None = Field(default=2.0, ge=0)
    pgv2_timestamp_skew_seconds: float = Field(default=300.0, gt=0)
    pgv2_nonce_window_seconds: float = Field(default=600.0, gt=0)

    # Seed for `probability` faults, so a chaos run can be replayed.
    fault_seed: int | None = None

    @model_validator(mode="after")
    def _read_key_file_and_check_delays(self) -> Self:
        if self.bbmsl_public_key is None and self.bbmsl_public_key_file is not None:
            self.bbmsl_public_key = self.bbmsl_public_key_file.read_text(encoding="utf-8")
        initiated = self.vaultspay_auto_advance_initiated_after_seconds
        final = self.vaultspay_auto_advance_final_after_seconds
        if initiated is not None and final is not None and initiated > final:
            raise ValueError(
                "vaultspay_auto_advance_initiated_after_seconds must not exceed "
                "vaultspay_auto_advance_final_after_seconds"
            )
        return self
