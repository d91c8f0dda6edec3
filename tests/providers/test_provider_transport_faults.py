"""Transport faults on the refund and status endpoints of bbmsl, vaultspay and pgv2: what could
not have reached the gateway is NotSent, what may have been applied is Ambiguous, 429 carries
its Retry-After. (Faults on vaultspay's token endpoint are in test_vaultspay_provider.py.)"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import httpx
import pytest

from providers.base import Ambiguous, GatewayRequest, NotSent, Provider, RateLimited
from providers.bbmsl import BbmslProvider, BbmslSettings
from providers.pgv2 import Pgv2Provider, Pgv2Settings
from providers.vaultspay import VaultspayProvider, VaultspaySettings
from tests.providers.helpers import json_response, refund_request

Responder = Callable[[httpx.Request], httpx.Response]
TOKEN_PATH = "/public/external/v1/merchant-auth"


def token_then(fault: Responder) -> Responder:
    """vaultspay: a good token, so the fault hits the refund (or status) request itself."""

    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.path == TOKEN_PATH:
            return json_response(
                200,
                {
                    "message": "Successful.",
                    "code": "200",
                    "data": {"access_token": "t", "token_expiry": 3600},
                },
            )
        return fault(request)

    return respond


@pytest.fixture(params=["bbmsl", "vaultspay", "pgv2"])
def build(
    request: pytest.FixtureRequest,
    bbmsl_settings: BbmslSettings,
    vaultspay_settings: VaultspaySettings,
    pgv2_settings: Pgv2Settings,
) -> Callable[[Responder], Provider]:
    gateway = request.param

    def make(fault: Responder) -> Provider:
        if gateway == "bbmsl":
            return BbmslProvider(bbmsl_settings, httpx.Client(transport=httpx.MockTransport(fault)))
        if gateway == "vaultspay":
            transport = httpx.MockTransport(token_then(fault))
            return VaultspayProvider(vaultspay_settings, httpx.Client(transport=transport))
        return Pgv2Provider(pgv2_settings, httpx.Client(transport=httpx.MockTransport(fault)))

    return make


def raising(exception: type[httpx.TransportError]) -> Responder:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exception("injected", request=request)

    return respond


VERBS: dict[str, Callable[[Provider, GatewayRequest], object]] = {
    "refund": lambda provider, request: provider.refund(request),
    "status": lambda provider, request: provider.status(request),
}


def job() -> GatewayRequest:
    return refund_request(amount=Decimal("10.00"), provider_reference="RFRQ_1")


@pytest.mark.parametrize("verb", sorted(VERBS))
@pytest.mark.parametrize(
    "fault",
    [raising(httpx.ConnectError), raising(httpx.ConnectTimeout), raising(httpx.PoolTimeout)],
    ids=["connect-error", "connect-timeout", "pool-timeout"],
)
def test_request_that_never_left_is_not_sent(
    build: Callable[[Responder], Provider], verb: str, fault: Responder
) -> None:
    with pytest.raises(NotSent) as caught:
        VERBS[verb](build(fault), job())
    assert not isinstance(caught.value, RateLimited)


@pytest.mark.parametrize("verb", sorted(VERBS))
@pytest.mark.parametrize(
    "fault",
    [
        raising(httpx.ReadTimeout),
        raising(httpx.WriteTimeout),
        raising(httpx.RemoteProtocolError),
        raising(httpx.ReadError),
        lambda request: httpx.Response(500, text="boom"),
        lambda request: httpx.Response(502, text="bad gateway"),
        lambda request: httpx.Response(504, text="timeout"),
        lambda request: httpx.Response(200, text='{"truncated": '),
        lambda request: httpx.Response(200, text="[1, 2]"),
    ],
    ids=[
        "read-timeout",
        "write-timeout",
        "remote-protocol-error",
        "read-error",
        "500",
        "502",
        "504",
        "malformed-json",
        "json-not-object",
    ],
)
def test_request_that_may_have_been_applied_is_ambiguous(
    build: Callable[[Responder], Provider], verb: str, fault: Responder
) -> None:
    with pytest.raises(Ambiguous):
        VERBS[verb](build(fault), job())


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_429_is_rate_limited_with_the_gateways_retry_after(
    build: Callable[[Responder], Provider], verb: str
) -> None:
    def fault(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "17"})

    with pytest.raises(RateLimited) as caught:
        VERBS[verb](build(fault), job())
    assert caught.value.retry_after == 17
    assert caught.value.http_status == 429


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_503_without_retry_after_is_not_sent(
    build: Callable[[Responder], Provider], verb: str
) -> None:
    with pytest.raises(NotSent) as caught:
        VERBS[verb](build(lambda request: httpx.Response(503)), job())
    assert caught.value.http_status == 503
    assert not isinstance(caught.value, RateLimited)
