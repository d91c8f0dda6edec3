"""worker.logs on its own: what it masks, and that everything a refundq process logs (its own
events, uvicorn's server and access lines, Python warnings, tracebacks) comes out as one JSON
object per line. Configured in a child process, so this test run's logging stays as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.stack import REPO
from worker.logs import _substitute, scrub

PEM = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
    "-----END PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer eyJhbGciOi.J9-x_y", "eyJhbGciOi.J9-x_y"),
        ("V2_SHA256 appId=a,sign=0fa9e1c2d3,timestamp=1", "0fa9e1c2d3"),
        (f"key={PEM!r}", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"),
        (PEM, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"),
        ("{'x-api-key': 'k-123456'}", "k-123456"),
        ('{"client_secret": "cs-98765"}', "cs-98765"),
        ('{"request": "{}", "signature": "c2lnbmF0dXJl+/="}', "c2lnbmF0dXJl+/="),
        ('"POST /webhooks/vaultspay/abc123.0123456789abcdef HTTP/1.1" 200', "0123456789abcdef"),
    ],
    ids=[
        "bearer-token",
        "pgv2-sign",
        "pem-in-a-repr",
        "pem",
        "api-key-header",
        "client-secret",
        "bbmsl-signature",
        "callback-token",
    ],
)
def test_scrub_masks_credentials_in_free_text(text: str, secret: str):
    assert secret in text
    assert secret not in scrub(text)


# Pieces of the texts each masking pattern looks for, and of what they mask.
FRAGMENTS = [
    "Bearer ", "bearer\t", "sign=", "SIGN=", "0fa9", "abc", "-----BEGIN ", "RSA ",
    "PRIVATE KEY-----", "-----END ", "api_key", "API-KEY", "apikey", "secret", "Password",
    "token", "'", '"', ":", "=", " ", ",", "}", "signature", "/webhooks/", "vaultspay/",
    "job_1.", "Task refundq.execute_job",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=12))
def test_scrub_skips_only_texts_no_pattern_could_match(pieces: list[str]):
    """The quick look for a hint word must never let through what the patterns would mask."""
    text = "".join(pieces)
    assert scrub(text) == _substitute(text)


def test_scrub_keeps_prose_and_the_job_id_readable():
    assert scrub("bbmsl 1001: Invalid signature: the key BBMSL holds is not ours") == (
        "bbmsl 1001: Invalid signature: the key BBMSL holds is not ours"
    )
    assert "/webhooks/vaultspay/abc123.[redacted]" in scrub("/webhooks/vaultspay/abc123.0f0f0f")


CHILD = r"""
import logging, logging.config, warnings
import uvicorn.config

# What uvicorn does before it imports the app: handlers of its own on its loggers.
logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)

from worker.logs import configure_logging, get_logger
configure_logging("INFO")

log = get_logger("refundq.test")
log.info("job.attempt", job_id="j1", provider="pgv2", attempt=2, outcome="succeeded",
         api_key="k-secret-1", authorization="Bearer t-secret-2")
logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
logging.getLogger("uvicorn.access").info(
    '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "POST",
    "/webhooks/vaultspay/job1.00112233445566778899aabbccddeeff", "1.1", 200)
warnings.warn("something is deprecated", DeprecationWarning, stacklevel=1)
try:
    raise RuntimeError("gateway said no to Bearer t-secret-3")
except RuntimeError:
    log.exception("provider.bug", job_id="j1")

# A prefork pool process reports its own failures through billiard's logger, which billiard
# makes non-propagating (a soft time limit landing between two tasks did this under load).
import billiard.util
try:
    raise TimeoutError("soft time limit")
except TimeoutError as exc:
    billiard.util.get_logger()
    billiard.util.error("Pool process %r error: %r", "worker-1", exc, exc_info=1)
"""


def test_every_record_is_one_json_line_with_secrets_masked():
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDQ_")}
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", CHILD],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    by_event = {e["event"].split(" ")[0]: e for e in events}

    attempt = by_event["job.attempt"]
    assert (attempt["job_id"], attempt["provider"], attempt["attempt"], attempt["outcome"]) == (
        "j1",
        "pgv2",
        2,
        "succeeded",
    )
    assert attempt["level"] == "info" and attempt["timestamp"]
    assert by_event["Started"]["logger"] == "uvicorn.error"
    access = next(e for e in events if e["logger"] == "uvicorn.access")
    assert "/webhooks/vaultspay/job1.[redacted]" in access["event"]
    assert any(e["logger"] == "py.warnings" for e in events)
    failure = by_event["provider.bug"]
    assert "RuntimeError" in failure["exception"]
    pool = next(e for e in events if e["logger"] == "multiprocessing")
    assert pool["level"] == "error" and "TimeoutError" in pool["exception"]
    for secret in ("k-secret-1", "t-secret-2", "t-secret-3", "00112233445566778899aabbccddeeff"):
        assert secret not in result.stderr
