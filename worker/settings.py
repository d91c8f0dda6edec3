"""refundq's own settings (`REFUNDQ_*`, a `.env` file, or `*_FILE` for secrets).

Gateway credentials live with their provider (`providers/<gateway>.py`, `GatewaySettings`); this
module holds what the runtime needs: where the database and broker are, and the timing policy.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from providers.config import env_with_files_sources


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="REFUNDQ_",
        env_file=".env",
        extra="ignore",
        env_ignore_empty=True,
        hide_input_in_errors=True,
    )

    broker_url: str = "redis://localhost:6379/0"
    database_url: str = "sqlite:///refundq.db"

    # --- Leases and time limits -------------------------------------------------------------
    # A worker's hold on a `submitting` job. The task's hard time limit is below it, so a worker
    # that still runs can never lose its lease to the reaper while it talks to the gateway.
    lease_seconds: float = Field(default=120.0, gt=0)
    task_time_limit_seconds: float = Field(default=90.0, gt=0)
    http_timeout_seconds: float = Field(default=20.0, gt=0)
    http_connect_timeout_seconds: float = Field(default=5.0, gt=0)

    # --- Retries (DESIGN.md rule 6) -----------------------------------------------------------
    # delay = floor + full jitter over min(cap, base * 2**(attempt-1)).
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_cap_seconds: float = Field(default=600.0, gt=0)
    retry_floor_seconds: float = Field(default=1.0, ge=0)
    # How long a refund that never reached its gateway keeps trying through an outage before it
    # fails (it fails only once its attempts are used up too).
    retry_patience_seconds: float = Field(default=3600.0, ge=0)
    # Countdowns longer than this are not handed to Celery (they would outlive the broker's
    # visibility timeout and run twice); `dispatch_queued` picks the job up from the database.
    max_countdown_seconds: float = Field(default=300.0, gt=0)

    # --- Beat -------------------------------------------------------------------------------
    dispatch_interval_seconds: float = Field(default=5.0, gt=0)
    reap_interval_seconds: float = Field(default=5.0, gt=0)
    poll_interval_seconds: float = Field(default=5.0, gt=0)
    # A job waiting this long past its due time (queued or retry_wait) is published again: its
    # message may have been lost (Redis flushed or restarted without persistence).
    redispatch_after_seconds: float = Field(default=10.0, gt=0)
    dispatch_batch_size: int = Field(default=500, gt=0)
    # SQLite only: how often beat copies the write-ahead log into the database (worker/db.py).
    checkpoint_interval_seconds: float = Field(default=1.0, gt=0)

    # --- vaultspay-style settlement polling ---------------------------------------------------
    poll_batch_size: int = Field(default=200, gt=0)
    poll_deadline_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    # A table of delays (seconds) between status polls; the last one repeats. See worker/polling.py.
    poll_schedule_seconds: list[float] | None = None

    # --- Per-gateway rate limits (worker/ratelimit.py) ----------------------------------------
    # JSON, calls per second per gateway, shared by all workers: '{"bbmsl": 10}'.
    rate_limits: str | None = None
    # Redis for the limiter's schedule (default: the broker, when it is Redis).
    rate_limit_redis_url: str | None = None

    # --- Reconciliation ------------------------------------------------------------------------
    reconcile_interval_seconds: float = Field(default=24 * 3600.0, gt=0)
    reports_dir: Path | None = None

    # --- Webhooks -----------------------------------------------------------------------------
    # Derives per-job callback tokens (HMAC); without it no callback URL is handed out.
    webhook_secret: SecretStr | None = None

    # --- HTTP API for shops, and notifications to them (issue 5; docs/http-api.md) ------------
    # API keys, stored only as salted hashes: `name:key_id:salt:hash` lines (`refundq apikey
    # create`). REFUNDQ_API_KEYS holds such lines (newline or comma separated);
    # REFUNDQ_API_KEYS_FILE names a file of them, which the API re-reads whenever it changes, so
    # a new or a revoked key counts without a restart. The inline field is named apart from the
    # file on purpose: the generic `*_FILE` mechanism would read the file once, at start, and a
    # revoked key would be honoured until the next restart.
    api_key_hashes: str | None = Field(
        default=None, validation_alias=AliasChoices("REFUNDQ_API_KEYS", "api_key_hashes")
    )
    api_keys_file: Path = Path("refundq-api-keys")
    # Signs what refundq POSTs to a job's notify_url (HMAC-SHA256); without it nothing is sent.
    notify_secret: SecretStr | None = None
    # Capped at half the task time limit (a delivery must end before Celery kills its task).
    notify_timeout_seconds: float = Field(default=10.0, gt=0)
    notify_max_attempts: int = Field(default=8, ge=1)
    # Delays between deliveries of one notification; the last repeats (worker/notify.py).
    notify_retry_schedule_seconds: list[float] | None = None
    notify_sweep_interval_seconds: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _rate_limits_readable(self) -> Settings:
        from worker.ratelimit import parse_limits

        parse_limits(self.rate_limits)
        return self

    @model_validator(mode="after")
    def _time_limit_inside_lease(self) -> Settings:
        if self.task_time_limit_seconds >= self.lease_seconds:
            raise ValueError(
                "REFUNDQ_TASK_TIME_LIMIT_SECONDS must be below REFUNDQ_LEASE_SECONDS, or a slow "
                "worker could lose its lease while still talking to the gateway"
            )
        if self.http_timeout_seconds + self.http_connect_timeout_seconds >= (
            self.task_time_limit_seconds
        ):
            raise ValueError(
                "REFUNDQ_HTTP_TIMEOUT_SECONDS + REFUNDQ_HTTP_CONNECT_TIMEOUT_SECONDS must be below "
                "REFUNDQ_TASK_TIME_LIMIT_SECONDS"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_with_files_sources(settings_cls, init_settings, env_settings, dotenv_settings)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests call `get_settings.cache_clear()`."""
    return Settings()
