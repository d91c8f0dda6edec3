"""Fault injection: rules that make a gateway endpoint misbehave on purpose.

A rule matches calls by gateway, endpoint (or "*") and optionally the payment the call is about.
Exactly one rule (the oldest active one that matches and wins its probability roll) is chosen per
call, before the call is handled, and the choice is recorded in the call log; deciding once is
what lets a test reason about "the refund was applied, then the connection died".

Kinds and whether the gateway acts on the request:

=================  =======  ====================================================================
kind               applied  what the client sees
=================  =======  ====================================================================
latency            yes      the normal answer, `latency_ms` later
error              no       HTTP `status` (default 503), small JSON body
rate_limit         no       429 with `Retry-After: retry_after` (default 1)
outage             no       503 for every matching call for `duration_seconds` after creation
drop               no       response headers, then the connection closes mid-body
apply_then_drop    yes      the same, after the refund/cancel was applied
malformed          yes      200 with a body that is not JSON
bad_signature      yes      pgv2 only: the normal answer with a wrong response signature
=================  =======  ====================================================================
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

FaultKind = Literal[
    "latency",
    "error",
    "rate_limit",
    "drop",
    "apply_then_drop",
    "malformed",
    "bad_signature",
    "outage",
]
GatewayName = Literal["vai247", "bbmsl", "vaultspay", "pgv2"]

ENDPOINTS: dict[str, tuple[str, ...]] = {
    "vai247": ("refund", "cancel"),
    "bbmsl": ("refund", "query"),
    "vaultspay": ("auth", "create", "status"),
    "pgv2": ("refund", "query"),
}
# The kinds that answer instead of the gateway: the request is never acted upon.
NOT_APPLIED: frozenset[str] = frozenset({"error", "rate_limit", "drop", "outage"})
DEFAULT_ERROR_STATUS = 503
DEFAULT_RETRY_AFTER_SECONDS = 1.0


class FaultSpec(BaseModel):
    """A fault rule as the admin API receives it."""

    model_config = ConfigDict(extra="forbid")

    gateway: GatewayName
    endpoint: str = "*"
    kind: FaultKind
    times: int | None = Field(default=None, ge=1)
    probability: float | None = Field(default=None, ge=0.0, le=1.0)
    status: int | None = Field(default=None, ge=400, le=599)
    retry_after: float | None = Field(default=None, ge=0.0)
    latency_ms: int | None = Field(default=None, ge=0)
    duration_seconds: float | None = Field(default=None, gt=0.0)
    payment_ref: str | None = None

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        endpoints = ENDPOINTS[self.gateway]
        if self.endpoint != "*" and self.endpoint not in endpoints:
            raise ValueError(
                f"{self.gateway} has no endpoint {self.endpoint!r}; "
                f"use one of {', '.join(endpoints)} or '*'"
            )
        if self.kind == "bad_signature" and self.gateway != "pgv2":
            raise ValueError("bad_signature exists only for pgv2 (the only signed responses)")
        if self.kind == "latency" and self.latency_ms is None:
            raise ValueError("a latency fault needs latency_ms")
        if self.kind == "outage" and self.duration_seconds is None:
            raise ValueError("an outage needs duration_seconds")
        return self


@dataclass
class FaultRule:
    """A live rule: its spec, when it was created, and how often it fired."""

    id: str  # "flt_<n>": a string, so clients can treat it as an opaque token
    spec: FaultSpec
    created_at: datetime
    created_monotonic: float
    fired: int = 0

    def is_active(self, now: float) -> bool:
        """Not exhausted (`times`) and not expired (`duration_seconds`)."""
        if self.spec.times is not None and self.fired >= self.spec.times:
            return False
        duration = self.spec.duration_seconds
        return duration is None or now - self.created_monotonic < duration

    def matches(self, gateway: str, endpoint: str, payment_ref: str | None) -> bool:
        spec = self.spec
        if spec.gateway != gateway or spec.endpoint not in ("*", endpoint):
            return False
        return spec.payment_ref is None or spec.payment_ref == payment_ref

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def error_status(self) -> int:
        return self.spec.status or DEFAULT_ERROR_STATUS

    @property
    def retry_after(self) -> float:
        if self.spec.retry_after is None:
            return DEFAULT_RETRY_AFTER_SECONDS
        return self.spec.retry_after

    def view(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            **self.spec.model_dump(),
            "fired": self.fired,
            "active": self.is_active(now),
            "created_at": self.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }


class FaultBook:
    """The rules, in creation order. Not thread-safe: used from the event loop only, and
    `decide` never awaits, so two concurrent calls cannot both take a rule's last `times`."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._random = random.Random(seed)
        self._rules: dict[str, FaultRule] = {}
        self._next_id = 1

    def add(self, spec: FaultSpec) -> FaultRule:
        rule = FaultRule(
            id=f"flt_{self._next_id}",
            spec=spec,
            created_at=datetime.now(UTC),
            created_monotonic=time.monotonic(),
        )
        self._next_id += 1
        self._rules[rule.id] = rule
        return rule

    def rules(self) -> list[FaultRule]:
        return list(self._rules.values())

    def remove(self, rule_id: str) -> bool:
        return self._rules.pop(rule_id, None) is not None

    def clear(self) -> None:
        self._rules.clear()
        # Re-seeding makes a seeded run after a reset replay the same rolls.
        self._random = random.Random(self._seed)

    def decide(
        self, gateway: str, endpoint: str, payment_ref: str | None, now: float
    ) -> FaultRule | None:
        """The rule that fires for this call (counted as fired), or None."""
        if not self._rules:
            return None
        for rule in self._rules.values():
            if not rule.matches(gateway, endpoint, payment_ref) or not rule.is_active(now):
                continue
            probability = rule.spec.probability
            if probability is not None and self._random.random() >= probability:
                continue
            rule.fired += 1
            return rule
        return None
