"""Errors a producer or operator sees. Each says what is wrong and what to do about it.

`InvalidRequest` and its kin are "bad input" (CLI exit 2, HTTP 422/409); nothing was stored and
nothing was published when one is raised.
"""

from __future__ import annotations


class RefundqError(Exception):
    """Base of refundq's own errors."""


class InvalidRequest(RefundqError, ValueError):
    """The request cannot be accepted as given; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OverRefund(InvalidRequest):
    """Refunds of one payment would add up to more than its original amount."""


class ProviderUnavailable(InvalidRequest):
    """The provider is unknown, or its settings are missing (names the variables)."""


class IdempotencyConflict(RefundqError):
    """The idempotency key was used before for a different request (Stripe semantics)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for a different request (job {job_id}); "
            "use a new key for a new request, or repeat the original request exactly"
        )
        self.key = key
        self.job_id = job_id


class JobNotFound(RefundqError, LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class TransitionRefused(RefundqError):
    """An operator action that the job's current state does not allow."""
