"""vaultspay provider: the token life cycle, the refund request on the wire, status mapping,
and the callback parser."""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from providers.base import (
    Ambiguous,
    InvalidForGateway,
    Kind,
    NotSent,
    NotSupported,
    Outcome,
    RateLimited,
)
from providers.vaultspay import (
    AccessToken,
    VaultspayAuthResponse,
    VaultspayCallback,
    VaultspayErrorResponse,
    VaultspayProvider,
    VaultspayRefundRequest,
    VaultspayRefundResponse,
    VaultspaySettings,
    VaultspayStatusRequest,
    VaultspayStatusResponse,
    is_partial_flag,
    parse_callback,
)
from tests.providers.conftest import VAULTSPAY_BASE_URL, VAULTSPAY_CLIENT_SECRET
from tests.providers.helpers import (
    Recorder,
    assert_round_trip,
    fixture_json,
    fixture_text,
    json_response,
    refund_request,
)

AUTH_PATH = "/public/external/v1/merchant-auth"
CREATE_PATH = "/public/external/v1/create-refund-request"
STATUS_PATH = "/public/external/v1/get-refund-request"
UUID = "RFRQ_57A4FCBC-60B7-4C32-AD90-9FD3C06F3B59"

Responder = Callable[[httpx.Request], httpx.Response]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def created(request: httpx.Request) -> httpx.Response:
    """The seed's create answer, for the amount that was asked."""
    asked = json.loads(request.content)
    answer = copy.deepcopy(fixture_json("vaultspay", "create_refund_response.json"))
    answer["data"].update(uuid=UUID, amount=asked["amount"], is_partial=asked["isPartial"])
    return json_response(200, answer)


def status_answer(status: int, status_str: str, amount: str = "10.00") -> Responder:
    def respond(request: httpx.Request) -> httpx.Response:
        answer = copy.deepcopy(fixture_json("vaultspay", "get_refund_request_response.json"))
        answer["data"].update(uuid=UUID, status=status, status_str=status_str, amount=amount)
        return json_response(200, answer)

    return respond


class FakeVaultspay:
    """Issues tokens on merchant-auth, refuses unknown or revoked ones with 401 like the
    gateway, and hands authenticated calls to `on_create` / `on_status`."""

    def __init__(
        self,
        *,
        on_create: Responder = created,
        on_status: Responder | None = None,
        token_expiry: int = 3600,
        credentials_ok: bool = True,
    ) -> None:
        self.on_create = on_create
        self.on_status = on_status or status_answer(0, "Pending")
        self.token_expiry = token_expiry
        self.credentials_ok = credentials_ok
        self.valid_tokens: set[str] = set()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self.recorder = Recorder(self._handle)

    @property
    def auth_calls(self) -> list[httpx.Request]:
        return self.recorder.to(AUTH_PATH)

    def revoke_all(self) -> None:
        self.valid_tokens.clear()

    def _handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == AUTH_PATH:
            if not self.credentials_ok:
                refused = fixture_json("vaultspay", "merchant_auth_401_inferred.json")
                return json_response(401, refused)
            with self._lock:
                token = f"token-{next(self._numbers)}"
            self.valid_tokens.add(token)
            answer = fixture_json("vaultspay", "merchant_auth_response_inferred.json")
            answer["data"].update(access_token=token, token_expiry=self.token_expiry)
            return json_response(200, answer)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.valid_tokens:
            unauthenticated = fixture_json("vaultspay", "unauthenticated_401_inferred.json")
            return json_response(401, unauthenticated)
        if request.url.path == CREATE_PATH:
            return self.on_create(request)
        return self.on_status(request)

    def provider(
        self, settings: VaultspaySettings, clock: FakeClock | None = None
    ) -> VaultspayProvider:
        return VaultspayProvider(settings, self.recorder.client(), clock=clock or FakeClock())


def bearer(request: httpx.Request) -> str:
    return request.headers["Authorization"].removeprefix("Bearer ")


# ---- contract fixtures (seed 002 and inferred shapes) ----


def test_vaultspay_seed_create_response_round_trips_through_the_response_model() -> None:
    parsed = assert_round_trip(
        VaultspayRefundResponse, fixture_json("vaultspay", "create_refund_response.json")
    )
    assert parsed.data.uuid == "RFRQ_xyz"
    assert parsed.data.amount == Decimal("50.50")


def test_vaultspay_seed_status_response_round_trips_through_the_response_model() -> None:
    parsed = assert_round_trip(
        VaultspayStatusResponse, fixture_json("vaultspay", "get_refund_request_response.json")
    )
    assert parsed.data.status == 2


def test_vaultspay_seed_requests_parse_into_the_request_models() -> None:
    assert_round_trip(
        VaultspayRefundRequest, fixture_json("vaultspay", "create_refund_request.json")
    )
    assert_round_trip(
        VaultspayStatusRequest, fixture_json("vaultspay", "get_refund_request_request.json")
    )


def test_vaultspay_seed_callback_round_trips_with_decimal_amounts() -> None:
    callback = assert_round_trip(VaultspayCallback, fixture_json("vaultspay", "callback.json"))
    assert callback.fee == Decimal("0.5")


def test_vaultspay_inferred_fixtures_round_trip() -> None:
    assert_round_trip(
        VaultspayAuthResponse, fixture_json("vaultspay", "merchant_auth_response_inferred.json")
    )
    for name in (
        "merchant_auth_401_inferred.json",
        "unauthenticated_401_inferred.json",
        "error_422_inferred.json",
        "error_404_inferred.json",
        "refund_request_not_found_404_inferred.json",
    ):
        assert_round_trip(VaultspayErrorResponse, fixture_json("vaultspay", name))


# ---- the callback helper ----


def test_vaultspay_parse_callback_reads_the_seed_body_as_decimals_and_hints_success() -> None:
    callback = parse_callback(fixture_text("vaultspay", "callback.json").encode())

    assert callback.vp_transaction_id == "RF_C1KXG2T9H0RMK."
    assert callback.reference_id == "RFRQ_...."
    assert (callback.amount, callback.fee, callback.vat) == (
        Decimal("10"),
        Decimal("0.5"),
        Decimal("0"),
    )
    assert callback.hinted_outcome() is Outcome.SUCCEEDED


def test_vaultspay_callback_numbers_never_go_through_float() -> None:
    body = (
        '{"vpTransactionId":"RF_1","clientReference":"RFRQ_1","amount":0.1,"fee":0.2,'
        '"vat":0,"status":"REJECTED","referenceId":"RFRQ_1"}'
    )
    callback = parse_callback(body)
    assert callback.amount + callback.fee == Decimal("0.3")
    assert callback.hinted_outcome() is Outcome.DECLINED


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"status": "SUCCESS"}',
        '{"vpTransactionId":"x","clientReference":"y",'
        '"amount":"ten","fee":"0","vat":"0","status":"SUCCESS","referenceId":"z"}',
    ],
)
def test_vaultspay_malformed_callback_is_a_value_error(body: str) -> None:
    with pytest.raises(ValueError):
        parse_callback(body)


def test_vaultspay_callback_with_an_unknown_status_hints_nothing() -> None:
    payload = fixture_json("vaultspay", "callback.json")
    payload["status"] = "ON_HOLD"
    assert parse_callback(json.dumps(payload, default=str)).hinted_outcome() is None


# ---- the refund request on the wire ----


def test_vaultspay_refund_request_carries_the_bearer_token_and_strings_throughout(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay()
    provider = gateway.provider(vaultspay_settings)
    provider.refund(
        refund_request(
            payment_ref="PL_xyz",
            amount=Decimal("50.5"),
            original_amount=Decimal("100"),
            callback_url="https://shop.test/webhooks/vaultspay/abc.def",
        )
    )

    (auth,) = gateway.auth_calls
    assert str(auth.url) == VAULTSPAY_BASE_URL + AUTH_PATH
    assert json.loads(auth.content) == {
        "clientId": "vp-client",
        "clientSecret": VAULTSPAY_CLIENT_SECRET,
    }
    (create,) = gateway.recorder.to(CREATE_PATH)
    assert str(create.url) == VAULTSPAY_BASE_URL + CREATE_PATH
    assert create.headers["Authorization"] == "Bearer token-1"
    assert create.headers["Content-Type"] == "application/json"
    assert create.content == (
        b'{"transactionId":"PL_xyz","isPartial":"1","amount":"50.50",'
        b'"callbackHookUrl":"https://shop.test/webhooks/vaultspay/abc.def"}'
    )


def test_vaultspay_full_refund_sends_the_amount_and_no_callback_without_a_callback_url(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay()
    gateway.provider(vaultspay_settings).refund(
        refund_request(payment_ref="PL_xyz", amount=Decimal("100"))
    )
    (create,) = gateway.recorder.to(CREATE_PATH)
    assert create.content == b'{"transactionId":"PL_xyz","isPartial":"0","amount":"100.00"}'


def test_vaultspay_created_request_is_pending_with_the_uuid_as_reference(
    vaultspay_settings: VaultspaySettings,
) -> None:
    result = FakeVaultspay().provider(vaultspay_settings).refund(refund_request())

    assert result.outcome is Outcome.PENDING
    assert result.provider_reference == UUID
    assert result.code == "200"


# ---- the token ----


def test_vaultspay_token_is_fetched_once_and_reused_across_calls(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay(on_status=status_answer(1, "Initiated"))
    provider = gateway.provider(vaultspay_settings)
    for _ in range(3):
        provider.refund(refund_request())
    provider.status(refund_request(provider_reference=UUID))

    assert len(gateway.auth_calls) == 1
    assert {bearer(r) for r in gateway.recorder.requests if r.url.path != AUTH_PATH} == {"token-1"}


def test_vaultspay_token_is_refreshed_shortly_before_it_expires(
    vaultspay_settings: VaultspaySettings,
) -> None:
    clock = FakeClock()
    gateway = FakeVaultspay(token_expiry=3600)
    provider = gateway.provider(vaultspay_settings, clock)

    provider.refund(refund_request())
    clock.now += 3600 - 61  # still more than the refresh margin left
    provider.refund(refund_request())
    assert len(gateway.auth_calls) == 1

    clock.now += 2  # inside the last minute: refresh before the gateway would refuse it
    provider.refund(refund_request())
    assert len(gateway.auth_calls) == 2
    assert bearer(gateway.recorder.to(CREATE_PATH)[-1]) == "token-2"


def test_vaultspay_short_lived_token_keeps_at_least_half_its_lifetime(
    vaultspay_settings: VaultspaySettings,
) -> None:
    clock = FakeClock()
    gateway = FakeVaultspay(token_expiry=30)
    provider = gateway.provider(vaultspay_settings, clock)
    provider.refund(refund_request())
    clock.now += 14
    provider.refund(refund_request())
    clock.now += 2
    provider.refund(refund_request())
    assert len(gateway.auth_calls) == 2


def test_vaultspay_401_triggers_exactly_one_refresh_and_one_resend(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay()
    provider = gateway.provider(vaultspay_settings)
    provider.refund(refund_request())
    gateway.revoke_all()  # the gateway forgot token-1 (restart, rotation)

    result = provider.refund(refund_request())

    assert result.outcome is Outcome.PENDING
    assert len(gateway.auth_calls) == 2
    creates = gateway.recorder.to(CREATE_PATH)
    assert [bearer(r) for r in creates] == ["token-1", "token-1", "token-2"]
    assert creates[1].content == creates[2].content


def test_vaultspay_second_401_after_a_fresh_token_fails_the_job_without_a_loop(
    vaultspay_settings: VaultspaySettings,
) -> None:
    unauthenticated = fixture_json("vaultspay", "unauthenticated_401_inferred.json")
    gateway = FakeVaultspay(on_create=lambda request: json_response(401, unauthenticated))
    result = gateway.provider(vaultspay_settings).refund(refund_request())

    assert result.outcome is Outcome.FAILED
    assert result.http_status == 401
    assert result.message is not None and "REFUNDQ_VAULTSPAY_CLIENT_ID" in result.message
    assert len(gateway.auth_calls) == 2
    assert len(gateway.recorder.to(CREATE_PATH)) == 2


def test_vaultspay_bad_client_credentials_fail_the_job_and_send_no_refund(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay(credentials_ok=False)
    result = gateway.provider(vaultspay_settings).refund(refund_request())

    assert result.outcome is Outcome.FAILED
    assert result.code == "401"
    assert result.message is not None
    assert "Invalid client credentials." in result.message
    assert "REFUNDQ_VAULTSPAY_CLIENT_ID" in result.message
    assert VAULTSPAY_CLIENT_SECRET not in result.message
    assert len(gateway.auth_calls) == 1
    assert gateway.recorder.to(CREATE_PATH) == []


def test_vaultspay_bad_client_credentials_on_a_status_poll_raise_not_sent(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay(credentials_ok=False)
    with pytest.raises(NotSent) as caught:
        gateway.provider(vaultspay_settings).status(refund_request(provider_reference=UUID))
    assert "REFUNDQ_VAULTSPAY_CLIENT_ID" in caught.value.message
    assert VAULTSPAY_CLIENT_SECRET not in caught.value.message


def connect_error(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused", request=request)


def read_timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("slow", request=request)


@pytest.mark.parametrize(
    "token_endpoint",
    [
        connect_error,
        read_timeout,
        lambda request: httpx.Response(500, text="boom"),
        lambda request: httpx.Response(200, text="{not json"),
        lambda request: json_response(200, {"code": "200", "data": {"token_expiry": 60}}),
        lambda request: httpx.Response(302, headers={"Location": "https://x.test"}),
    ],
)
def test_vaultspay_token_request_that_cannot_complete_is_not_sent_for_the_refund(
    vaultspay_settings: VaultspaySettings, token_endpoint: Responder
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.path == AUTH_PATH:
            return token_endpoint(request)
        return created(request)

    recorder = Recorder(respond)
    provider = VaultspayProvider(vaultspay_settings, recorder.client())
    with pytest.raises(NotSent) as caught:
        provider.refund(refund_request())
    assert recorder.to(CREATE_PATH) == []
    assert "token" in caught.value.message


def test_vaultspay_rate_limited_token_request_keeps_the_retry_after(
    vaultspay_settings: VaultspaySettings,
) -> None:
    recorder = Recorder(lambda request: httpx.Response(429, headers={"Retry-After": "12"}))
    with pytest.raises(RateLimited) as caught:
        VaultspayProvider(vaultspay_settings, recorder.client()).refund(refund_request())
    assert caught.value.retry_after == 12


def test_vaultspay_concurrent_jobs_share_one_token_fetch(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay()
    original = gateway._handle

    def slow_auth(request: httpx.Request) -> httpx.Response:
        if request.url.path == AUTH_PATH:
            time.sleep(0.05)  # long enough for every thread to arrive while it is in flight
        return original(request)

    gateway.recorder.respond = slow_auth
    provider = gateway.provider(vaultspay_settings)
    results: list[Outcome] = []
    threads = [
        threading.Thread(target=lambda: results.append(provider.refund(refund_request()).outcome))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == [Outcome.PENDING] * 8
    assert len(gateway.auth_calls) == 1


def test_vaultspay_access_token_repr_hides_the_token() -> None:
    assert "secret-token" not in repr(AccessToken(value="secret-token", refresh_at=1.0))


# ---- isPartial ----


@pytest.mark.parametrize(
    ("amount", "original", "partial", "expected"),
    [
        ("40", "100", None, "1"),
        ("100", "100", None, "0"),
        ("40", "100", "1", "1"),
        ("40", "100", "true", "1"),
        ("100", "100", "0", "0"),
        ("100", "100", "FALSE", "0"),
        ("40", None, None, "0"),
        ("40", None, "1", "1"),
        ("40", None, "true", "1"),
        ("40", None, "0", "0"),
        ("40", None, "false", "0"),
    ],
)
def test_vaultspay_is_partial_derivation(
    amount: str, original: str | None, partial: str | None, expected: str
) -> None:
    request = refund_request(
        amount=Decimal(amount),
        original_amount=Decimal(original) if original else None,
        extras={"partial": partial} if partial is not None else {},
    )
    assert is_partial_flag(request) == expected
    VaultspayProvider.validate_request(request)


@pytest.mark.parametrize(
    ("amount", "original", "partial", "fragment"),
    [
        ("120", "100", None, "exceeds the original"),
        ("100", "100", "1", "contradicts"),
        ("40", "100", "0", "contradicts"),
        ("40", None, "maybe", "one of 1, 0, true, false"),
    ],
)
def test_vaultspay_is_partial_that_cannot_be_told_is_refused_at_enqueue(
    amount: str, original: str | None, partial: str | None, fragment: str
) -> None:
    request = refund_request(
        amount=Decimal(amount),
        original_amount=Decimal(original) if original else None,
        extras={"partial": partial} if partial is not None else {},
    )
    with pytest.raises(InvalidForGateway, match=fragment):
        VaultspayProvider.validate_request(request)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"amount": Decimal("1.005")}, "2 decimals"),
        ({"amount": None}, "needs an amount"),
        ({"payment_ref": ""}, "transactionId"),
        ({"kind": Kind.CANCEL, "amount": None}, "no cancel"),
    ],
)
def test_vaultspay_validate_request_refuses_what_the_gateway_would(
    overrides: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidForGateway, match=fragment):
        VaultspayProvider.validate_request(refund_request(**overrides))


# ---- create refusals and odd answers ----


@pytest.mark.parametrize(
    ("status", "fixture"),
    [(422, "error_422_inferred.json"), (404, "error_404_inferred.json")],
)
def test_vaultspay_refusal_is_declined_with_the_gateway_message_and_code(
    vaultspay_settings: VaultspaySettings, status: int, fixture: str
) -> None:
    payload = fixture_json("vaultspay", fixture)
    gateway = FakeVaultspay(on_create=lambda request: json_response(status, payload))
    result = gateway.provider(vaultspay_settings).refund(refund_request())

    assert result.outcome is Outcome.DECLINED
    assert result.code == str(status)
    assert result.message == payload["message"]
    assert result.http_status == status


def test_vaultspay_403_is_failed_pointing_at_the_ip_allow_list(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay(
        on_create=lambda request: json_response(
            403, {"message": "Forbidden.", "code": "403", "data": None}
        )
    )
    result = gateway.provider(vaultspay_settings).refund(refund_request())
    assert result.outcome is Outcome.FAILED
    assert result.message is not None and "IP allow-list" in result.message


def test_vaultspay_4xx_that_is_not_its_envelope_is_failed_configuration(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay(on_create=lambda request: httpx.Response(404, text="<html/>"))
    result = gateway.provider(vaultspay_settings).refund(refund_request())
    assert result.outcome is Outcome.FAILED
    assert result.code == "HTTP_404"
    assert result.message is not None and "REFUNDQ_VAULTSPAY_BASE_URL" in result.message


@pytest.mark.parametrize(
    "answer",
    [
        {"message": "Successful.", "code": "200", "data": {"id": "1"}},  # no uuid
        {"message": "Successful.", "code": "200", "data": None},
        {"message": "Huh.", "code": "500", "data": {"uuid": UUID}},  # 2xx, not "200"
        {"message": "Successful."},
    ],
)
def test_vaultspay_2xx_without_a_uuid_is_ambiguous(
    vaultspay_settings: VaultspaySettings, answer: dict[str, Any]
) -> None:
    gateway = FakeVaultspay(on_create=lambda request: json_response(200, answer))
    with pytest.raises(Ambiguous) as caught:
        gateway.provider(vaultspay_settings).refund(refund_request())
    assert caught.value.code == "MALFORMED_RESPONSE"


def test_vaultspay_numeric_envelope_code_is_accepted(vaultspay_settings: VaultspaySettings) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        answer = json.loads(created(request).content)
        answer["code"] = 200
        return json_response(200, answer)

    result = FakeVaultspay(on_create=respond).provider(vaultspay_settings).refund(refund_request())
    assert result.outcome is Outcome.PENDING


def test_vaultspay_request_created_for_another_amount_is_unresolved(
    vaultspay_settings: VaultspaySettings,
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        answer = json.loads(created(request).content)
        answer["data"]["amount"] = "99.00"
        return json_response(200, answer)

    result = FakeVaultspay(on_create=respond).provider(vaultspay_settings).refund(refund_request())
    assert result.outcome is Outcome.UNRESOLVED
    assert result.provider_reference == UUID


# ---- status ----


def test_vaultspay_status_posts_the_uuid(vaultspay_settings: VaultspaySettings) -> None:
    gateway = FakeVaultspay()
    gateway.provider(vaultspay_settings).status(refund_request(provider_reference=UUID))
    (sent,) = gateway.recorder.to(STATUS_PATH)
    assert str(sent.url) == VAULTSPAY_BASE_URL + STATUS_PATH
    assert sent.content == f'{{"uuid":"{UUID}"}}'.encode()
    assert sent.headers["Authorization"] == "Bearer token-1"


@pytest.mark.parametrize(
    ("status", "status_str", "outcome", "code"),
    [
        (0, "Pending", Outcome.PENDING, "200"),
        (1, "Initiated", Outcome.PENDING, "200"),
        (2, "Processed", Outcome.SUCCEEDED, "200"),
        (3, "Cancelled", Outcome.DECLINED, "VAULTSPAY_CANCELLED"),
        (4, "Rejected", Outcome.DECLINED, "VAULTSPAY_REJECTED"),
    ],
)
def test_vaultspay_refund_request_status_maps_to_an_outcome(
    vaultspay_settings: VaultspaySettings,
    status: int,
    status_str: str,
    outcome: Outcome,
    code: str,
) -> None:
    gateway = FakeVaultspay(on_status=status_answer(status, status_str))
    result = gateway.provider(vaultspay_settings).status(refund_request(provider_reference=UUID))

    assert result.outcome is outcome
    assert result.code == code
    assert result.raw_status == f"{status}/{status_str}"
    assert result.provider_reference == UUID
    assert result.message == status_str
    assert result.settled_amount == (Decimal("10.00") if outcome is Outcome.SUCCEEDED else None)


def test_vaultspay_unknown_refund_request_status_is_ambiguous(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay(on_status=status_answer(7, "On hold"))
    with pytest.raises(Ambiguous) as caught:
        gateway.provider(vaultspay_settings).status(refund_request(provider_reference=UUID))
    assert caught.value.code == "UNKNOWN_STATUS"


def test_vaultspay_processed_for_another_amount_is_unresolved(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay(on_status=status_answer(2, "Processed", amount="5.00"))
    result = gateway.provider(vaultspay_settings).status(refund_request(provider_reference=UUID))
    assert result.outcome is Outcome.UNRESOLVED
    assert result.settled_amount == Decimal("5.00")


def test_vaultspay_status_about_another_uuid_is_ambiguous(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay(on_status=status_answer(2, "Processed"))
    with pytest.raises(Ambiguous) as caught:
        gateway.provider(vaultspay_settings).status(refund_request(provider_reference="RFRQ_OTHER"))
    assert caught.value.code == "MISMATCHED_RESPONSE"


def test_vaultspay_status_404_is_not_found(vaultspay_settings: VaultspaySettings) -> None:
    payload = fixture_json("vaultspay", "refund_request_not_found_404_inferred.json")
    gateway = FakeVaultspay(on_status=lambda request: json_response(404, payload))
    result = gateway.provider(vaultspay_settings).status(refund_request(provider_reference=UUID))

    assert result.outcome is Outcome.NOT_FOUND
    assert result.message == "Refund request not found."


def test_vaultspay_status_refused_after_a_fresh_token_raises_not_sent(
    vaultspay_settings: VaultspaySettings,
) -> None:
    unauthenticated = fixture_json("vaultspay", "unauthenticated_401_inferred.json")
    gateway = FakeVaultspay(on_status=lambda request: json_response(401, unauthenticated))
    with pytest.raises(NotSent):
        gateway.provider(vaultspay_settings).status(refund_request(provider_reference=UUID))
    assert len(gateway.recorder.to(STATUS_PATH)) == 2


def test_vaultspay_status_without_the_uuid_is_not_supported(
    vaultspay_settings: VaultspaySettings,
) -> None:
    gateway = FakeVaultspay()
    with pytest.raises(NotSupported):
        gateway.provider(vaultspay_settings).status(refund_request())
    assert gateway.recorder.requests == []
