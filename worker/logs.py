"""Structured logs: one JSON object per line (structlog), with job id, provider, attempt and
outcome as fields. Secrets never reach a log line: fields with secret-looking names are
redacted, and values that look like credentials are masked wherever they appear.

Every process refundq runs logs this way: the worker and beat (Celery's `setup_logging` signal,
`worker.app`), the API (`worker.api`, including uvicorn's own and access lines), the CLI, and
Flower (`flowerconfig.py`). tests/ops/test_logs_and_secrets.py runs jobs with known credentials
through all four gateways and greps every log line and broker message for them."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(
    r"(secret|password|passwd|token|api[_-]?key|authorization|signature|private[_-]?key|"
    r"client[_-]?secret|sign)$",
    re.IGNORECASE,
)
# Bearer tokens, V2_SHA256 signatures, PEM blocks, and `key=value` credentials in free text.
_SECRET_TEXT = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
    (re.compile(r"(?i)(sign=)[0-9a-f]+"), r"\1[redacted]"),
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL
        ),
        "[redacted private key]",
    ),
    (
        re.compile(r"(?i)((?:api[_-]?key|secret|password|token)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
        r"\1[redacted]",
    ),
    # A signature quoted as a value (bbmsl's envelope `"signature": "<base64>"`, `signature=...`);
    # prose such as "Invalid signature: ..." stays readable.
    (
        re.compile(r"(?i)([\"']signature[\"']\s*:\s*[\"']|signature=)[^\s\"',}&]+"),
        r"\1[redacted]",
    ),
    # A callback URL's token (`/webhooks/<provider>/<job id>.<hmac>`) lets its holder post callbacks
    # for that job: keep the job id, mask the HMAC (uvicorn's access log prints the path).
    (re.compile(r"(/webhooks/[^/\s\"']+/[^/\s\"'.]+\.)[0-9A-Fa-f]+"), r"\1[redacted]"),
]

# Libraries that install handlers of their own (uvicorn's dictConfig runs before the app module
# is imported): their records go through the JSON handler on the root logger instead.
_OWN_HANDLER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# Where Celery logs each task's arrival and result.
CELERY_PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


# Every pattern above needs one of these words. Nearly every logged string has none, and one
# search is cheaper than six substitutions: masking was two thirds of a log line's cost (issue 7).
_SECRET_HINT = re.compile(
    r"(?i)bearer|sign|private key|api[_-]?key|secret|password|token|/webhooks/"
)


def scrub(text: str) -> str:
    """`text` with anything credential-shaped masked."""
    if _SECRET_HINT.search(text) is None:
        return text
    return _substitute(text)


def _substitute(text: str) -> str:
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def _redact(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key):
            event[key] = "[redacted]"
        elif isinstance(value, str):
            event[key] = scrub(value)
    return event


def configure_logging(level: str | None = None) -> None:
    """JSON lines on stderr for refundq and the libraries under it (Celery, httpx, uvicorn)."""
    level = (level or os.environ.get("REFUNDQ_LOG_LEVEL") or "INFO").upper()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _OWN_HANDLER_LOGGERS:
        library_logger = logging.getLogger(name)
        library_logger.handlers.clear()
        library_logger.propagate = True
    # billiard (the prefork pool) logs through "multiprocessing" and makes that logger
    # non-propagating when it first uses it; without a handler of its own, a pool process's
    # error (a soft time limit landing between two tasks) reached stderr as bare text through
    # logging's last resort. A handler on the logger itself survives billiard's setting.
    logging.getLogger("multiprocessing").handlers[:] = [handler]
    # Python warnings (deprecations, Celery's security warnings) become log events too.
    logging.captureWarnings(True)
    # httpx logs every request URL at INFO; refundq logs its own attempts.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Celery logs two INFO lines per task (received, succeeded): a job's turn is its own
    # `job.attempt` line, and a sweep logs what it did. Formatting those two lines as JSON was
    # about 0.15 ms of CPU per job (issue 7). Errors still come through; at DEBUG all of it does.
    per_task_level = logging.NOTSET if level == "DEBUG" else logging.WARNING
    for name in CELERY_PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(per_task_level)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
