"""Contract: every answer the sandbox gives validates against the provider's own response model,
field for field (the seeds' examples do too: tests/providers). Recorded over real HTTP while
the real providers talk to the sandbox, so the simulators and the adapters cannot drift apart."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from providers import provider_class
from providers.base import GatewayRequest, Kind, Provider
from providers.bbmsl import BbmslErrorResponse, BbmslQueryResponse, BbmslRefundResponse
from providers.pgv2 import Pgv2Envelope, Pgv2RefundQueryResponse, Pgv2RefundResponse
from providers.vai247 import Vai247CancelResponse, Vai247Error, Vai247RefundResponse
from providers.vaultspay import (
    VaultspayAuthResponse,
    VaultspayErrorResponse,
    VaultspayRefundResponse,
    VaultspayStatusResponse,
)
from tests.providers.helpers import assert_round_trip, fixture_json
from tests.support.sandbox import SandboxAdmin, SandboxServer
from tests.support.stack import unique


class Recording(httpx.BaseTransport):
    """A real HTTP transport that keeps every (path, status, body) it carried."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen: list[tuple[str, int, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        body = response.read()
        self.seen.append((request.url.path, response.status_code, body))
        return httpx.Response(response.status_code, headers=response.headers, content=body)


@pytest.fixture
def talk(sandbox_server: SandboxServer) -> Iterator[Any]:
    """Build a provider pointed at the sandbox, with a recording transport."""
    saved = dict(os.environ)
    os.environ.update(sandbox_server.env())

    def make(gateway: str) -> tuple[Provider, Recording]:
        cls = provider_class(gateway)
        recording = Recording()
        return cls(cls.settings_class(), httpx.Client(transport=recording)), recording

    try:
        yield make
    finally:
        os.environ.clear()
        os.environ.update(saved)


def request(
    ref: str,
    amount: str | None,
    currency: str,
    kind: Kind = Kind.REFUND,
    provider_reference: str | None = None,
) -> GatewayRequest:
    return GatewayRequest(
        job_id=unique("j").replace("-", "")[:32],
        kind=kind,
        payment_ref=ref,
        currency=currency,
        amount=Decimal(amount) if amount else None,
        reason="contract test",
        provider_reference=provider_reference,
    )


def answers(recording: Recording, path_end: str) -> list[tuple[int, dict[str, Any]]]:
    return [
        (status, json.loads(body, parse_float=Decimal))
        for path, status, body in recording.seen
        if path.endswith(path_end)
    ]


def test_vai247_answers_fit_the_models(talk, sandbox_server: SandboxServer):
    admin = SandboxAdmin(sandbox_server.base_url)
    completed, pending = unique("ord"), unique("ord")
    admin.create_payment("vai247", completed, "90.00", "USD", status="completed")
    admin.create_payment("vai247", pending, "90.00", "USD", status="pending")
    provider, recording = talk("vai247")
    provider.refund(request(completed, "10.00", "USD"))
    provider.refund(request(unique("missing"), "10.00", "USD"))
    provider.cancel(request(pending, None, "USD", Kind.CANCEL))
    provider.cancel(request(completed, None, "USD", Kind.CANCEL))
    refunds = answers(recording, "/order/refund")
    cancels = answers(recording, "/order/cancel")
    assert [s for s, _ in refunds] == [200, 404] and [s for s, _ in cancels] == [200, 409]
    assert_round_trip(Vai247RefundResponse, refunds[0][1])
    assert_round_trip(Vai247Error, refunds[1][1])
    assert_round_trip(Vai247CancelResponse, cancels[0][1])
    assert_round_trip(Vai247Error, cancels[1][1])
    # And the seeds' own examples.
    assert_round_trip(Vai247RefundResponse, fixture_json("vai247", "refund_response.json"))
    assert_round_trip(Vai247CancelResponse, fixture_json("vai247", "cancel_response.json"))
    assert_round_trip(Vai247Error, fixture_json("vai247", "error_inferred.json"))


def test_bbmsl_answers_fit_the_models(talk, sandbox_server: SandboxServer):
    admin = SandboxAdmin(sandbox_server.base_url)
    ref = unique("bb")
    admin.create_payment("bbmsl", ref, "70.00", "HKD")
    provider, recording = talk("bbmsl")
    provider.refund(request(ref, "20.00", "HKD"))
    provider.status(request(ref, "20.00", "HKD"))
    provider.refund(request(ref, "20.00", "HKD"))  # refunds once per order: 3002
    refunds = answers(recording, "/hosted-checkout/refund")
    queries = answers(recording, "/hosted-checkout/query")
    assert_round_trip(BbmslRefundResponse, refunds[0][1])
    assert_round_trip(BbmslErrorResponse, refunds[1][1])
    assert refunds[1][1]["responseCode"] == "3002"
    assert_round_trip(BbmslQueryResponse, queries[0][1])


def test_vaultspay_answers_fit_the_models(talk, sandbox_server: SandboxServer):
    admin = SandboxAdmin(sandbox_server.base_url)
    ref = unique("PL")
    admin.create_payment("vaultspay", ref, "60.00", "AED")
    provider, recording = talk("vaultspay")
    created = provider.refund(request(ref, "60.00", "AED"))
    provider.status(request(ref, "60.00", "AED", provider_reference=created.provider_reference))
    partial = GatewayRequest(
        job_id="c" * 32,
        kind=Kind.REFUND,
        payment_ref=ref,
        currency="AED",
        amount=Decimal("60.00"),
        extras={"partial": "1"},
    )
    provider.refund(partial)  # partial must be below the full amount: 422
    assert_round_trip(VaultspayAuthResponse, answers(recording, "/merchant-auth")[0][1])
    creates = answers(recording, "/create-refund-request")
    assert_round_trip(VaultspayRefundResponse, creates[0][1])
    assert creates[1][0] == 422
    assert_round_trip(VaultspayErrorResponse, creates[1][1])
    assert_round_trip(VaultspayStatusResponse, answers(recording, "/get-refund-request")[0][1])


def test_pgv2_answers_fit_the_models(talk, sandbox_server: SandboxServer):
    admin = SandboxAdmin(sandbox_server.base_url)
    ref = unique("pay")
    admin.create_payment("pgv2", ref, "30.00", "INR")
    provider, recording = talk("pgv2")
    job = request(ref, "10.00", "INR")
    provider.refund(job)
    provider.status(job)
    provider.refund(request(ref, "99.00", "INR"))  # above the payment: REFUND_AMOUNT_EXCEEDED
    creates = answers(recording, "/refund/create")
    assert_round_trip(Pgv2RefundResponse, creates[0][1])
    assert creates[1][1]["code"] == "REFUND_AMOUNT_EXCEEDED"
    assert_round_trip(Pgv2Envelope, creates[1][1])
    assert_round_trip(Pgv2RefundQueryResponse, answers(recording, "/refund/query")[0][1])
