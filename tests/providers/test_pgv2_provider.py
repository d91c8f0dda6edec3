"""pgv2 provider: V2_SHA256 signatures both ways, and every code and status mapped."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import httpx
import pytest

from providers.base import Ambiguous, InvalidForGateway, Kind, NotSent, Outcome
from providers.pgv2 import (
    Pgv2Authorization,
    Pgv2Envelope,
    Pgv2Provider,
    Pgv2RefundQueryResponse,
    Pgv2RefundRequest,
    Pgv2RefundResponse,
    Pgv2Settings,
    Pgv2Signer,
    merchant_refund_no,
    verify_response_signature,
)
from tests.providers.conftest import PGV2_APP_ID, PGV2_APP_SECRET, PGV2_BASE_URL
from tests.providers.helpers import (
    JOB_ID,
    Recorder,
    assert_round_trip,
    fixture_json,
    fixture_text,
    hand_pgv2_sign,
    json_response,
    refund_request,
)

CREATE_URL = f"{PGV2_BASE_URL}/pg/v2/refund/create"
QUERY_URL = f"{PGV2_BASE_URL}/pg/v2/refund/query"
RESPONSE_TIMESTAMP = "1714128245401"
RESPONSE_NONCE = "28FA11BF8FD1309767551B4FD8A57BD5"


def signed(
    request: httpx.Request,
    payload: Any,
    *,
    app_id: str = PGV2_APP_ID,
    app_secret: str = PGV2_APP_SECRET,
    body: bytes | None = None,
) -> httpx.Response:
    """An answer signed as the gateway signs it (computed by hand, not by the provider)."""
    content = body if body is not None else json_response(200, payload).content
    sign = hand_pgv2_sign(
        app_id,
        app_secret,
        request.method,
        str(request.url),
        RESPONSE_TIMESTAMP,
        RESPONSE_NONCE,
        content,
    )
    header = (
        f"V2_SHA256 appId={app_id},sign={sign},"
        f"timestamp={RESPONSE_TIMESTAMP},nonce={RESPONSE_NONCE}"
    )
    return httpx.Response(
        200,
        content=content,
        headers={"Content-Type": "application/json", "Authorization": header},
    )


def ok_create(request: httpx.Request, **data_changes: Any) -> httpx.Response:
    answer = copy.deepcopy(fixture_json("pgv2", "refund_create_response.json"))
    answer["data"].update({"merchantRefundNo": JOB_ID, "amount": "10.00", **data_changes})
    return signed(request, answer)


def ok_query(request: httpx.Request, status: str, **data_changes: Any) -> httpx.Response:
    answer = copy.deepcopy(fixture_json("pgv2", "refund_query_response_inferred.json"))
    answer["data"].update(
        {"merchantRefundNo": JOB_ID, "amount": "10.00", "status": status, **data_changes}
    )
    return signed(request, answer)


def refusal(code: str, message: str = "refused") -> Any:
    return {"code": code, "errorMessage": message, "data": None}


def provider_with(
    settings: Pgv2Settings, respond: Any, **signer_options: Any
) -> tuple[Pgv2Provider, Recorder]:
    recorder = Recorder(respond)
    signer = Pgv2Signer(settings, **signer_options) if signer_options else None
    return Pgv2Provider(settings, recorder.client(), signer=signer), recorder


# ---- contract fixtures (seed 003 and inferred shapes) ----


def test_pgv2_seed_refund_create_response_round_trips_through_the_response_model() -> None:
    seed = fixture_json("pgv2", "refund_create_response.json")
    parsed = assert_round_trip(Pgv2RefundResponse, seed)
    assert parsed.data.refund_no == "20240423220624300800001097000005"
    assert parsed.data.amount == Decimal("50.00")


def test_pgv2_seed_refund_create_request_parses_into_the_request_model() -> None:
    assert_round_trip(Pgv2RefundRequest, fixture_json("pgv2", "refund_create_request.json"))


def test_pgv2_inferred_fixtures_round_trip() -> None:
    assert_round_trip(
        Pgv2RefundQueryResponse, fixture_json("pgv2", "refund_query_response_inferred.json")
    )
    for name in (
        "refund_not_found_inferred.json",
        "duplicate_merchant_refund_no_inferred.json",
        "sign_error_inferred.json",
    ):
        assert_round_trip(Pgv2Envelope, fixture_json("pgv2", name))


@pytest.mark.parametrize(
    ("name", "timestamp", "nonce"),
    [
        (
            "refund_create_request_authorization.txt",
            "1714128828114",
            "C7CA27DC6D55DA935DFC8450C721CC99",
        ),
        (
            "refund_create_response_authorization.txt",
            "1714128245401",
            "28FA11BF8FD1309767551B4FD8A57BD5",
        ),
    ],
)
def test_pgv2_seed_example_authorization_headers_parse(
    name: str, timestamp: str, nonce: str
) -> None:
    header = fixture_text("pgv2", name).strip()
    parsed = Pgv2Authorization.parse(header)

    assert parsed.app_id == "1111b620f93b48c5904210ff47bb1111"
    assert parsed.timestamp == timestamp
    assert parsed.nonce == nonce
    assert len(parsed.sign) == 64
    assert parsed.header_value() == header


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer abc",
        "V2_SHA256 appId=a,sign=" + "0" * 64 + ",timestamp=1",  # no nonce
        "V2_SHA256 appId=a,sign=xyz,timestamp=1,nonce=n",  # sign not hex
        "V2_SHA256 appId=a,sign=" + "0" * 64 + ",timestamp=soon,nonce=n",
        "V2_SHA256 appId=a,appId=b,sign=" + "0" * 64 + ",timestamp=1,nonce=n",
        "V2_SHA256 appId=a;sign=" + "0" * 64,
    ],
)
def test_pgv2_malformed_authorization_headers_do_not_parse(header: str) -> None:
    with pytest.raises(ValueError):
        Pgv2Authorization.parse(header)


# ---- the request on the wire ----


def test_pgv2_request_sign_equals_the_seven_lines_computed_by_hand(
    pgv2_settings: Pgv2Settings,
) -> None:
    provider, recorder = provider_with(
        pgv2_settings,
        ok_create,
        clock_ms=lambda: "1714128828114",
        nonce=lambda: "C7CA27DC6D55DA935DFC8450C721CC99",
    )
    provider.refund(
        refund_request(
            payment_ref="20240423220624300800001097000004", reason="User requested refund"
        )
    )

    (sent,) = recorder.requests
    assert str(sent.url) == CREATE_URL
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Accept"] == "application/json"
    assert sent.content == (
        b'{"merchantRefundNo":"' + JOB_ID.encode() + b'",'
        b'"paymentNo":"20240423220624300800001097000004",'
        b'"amount":"10.00","description":"User requested refund"}'
    )
    expected_sign = hand_pgv2_sign(
        PGV2_APP_ID,
        PGV2_APP_SECRET,
        "POST",
        CREATE_URL,
        "1714128828114",
        "C7CA27DC6D55DA935DFC8450C721CC99",
        sent.content,
    )
    assert sent.headers["Authorization"] == (
        f"V2_SHA256 appId={PGV2_APP_ID},sign={expected_sign},"
        "timestamp=1714128828114,nonce=C7CA27DC6D55DA935DFC8450C721CC99"
    )


def test_pgv2_each_send_has_a_fresh_timestamp_and_nonce_and_the_same_merchant_refund_no(
    pgv2_settings: Pgv2Settings,
) -> None:
    provider, recorder = provider_with(pgv2_settings, ok_create)
    provider.refund(refund_request())
    provider.refund(refund_request())

    first, second = (Pgv2Authorization.parse(r.headers["Authorization"]) for r in recorder.requests)
    assert first.nonce != second.nonce
    assert len(first.nonce) == 32 and int(first.nonce, 16) >= 0
    assert first.timestamp.isdigit() and len(first.timestamp) == 13  # unix milliseconds
    assert recorder.requests[0].content == recorder.requests[1].content


def test_pgv2_merchant_refund_no_is_the_job_id_or_a_stable_digest_of_at_most_50_chars() -> None:
    assert merchant_refund_no(JOB_ID) == JOB_ID
    long_id = "job:" + "x" * 80
    derived = merchant_refund_no(long_id)
    assert derived == merchant_refund_no(long_id)
    assert len(derived) <= 50
    assert derived != merchant_refund_no(long_id + "y")


@pytest.mark.parametrize(
    ("reason", "description"),
    [(None, "Refund"), ("", "Refund"), ("  ", "Refund"), ("Damaged item", "Damaged item")],
)
def test_pgv2_description_is_the_reason_or_a_default(
    pgv2_settings: Pgv2Settings, reason: str | None, description: str
) -> None:
    provider, recorder = provider_with(pgv2_settings, ok_create)
    provider.refund(refund_request(reason=reason))
    assert recorder.requests[0].content.endswith(f'"description":"{description}"}}'.encode())


# ---- response signature ----


def test_pgv2_correctly_signed_ok_is_succeeded_with_the_refund_no(
    pgv2_settings: Pgv2Settings,
) -> None:
    provider, _ = provider_with(pgv2_settings, ok_create)
    result = provider.refund(refund_request())

    assert result.outcome is Outcome.SUCCEEDED
    assert result.provider_reference == "20240423220624300800001097000005"
    assert result.code == "OK"
    assert result.settled_amount == Decimal("10.00")


def tampered_body(request: httpx.Request) -> httpx.Response:
    response = ok_create(request)
    body = bytearray(response.content)
    body[body.index(b"10.00")] = ord("9")  # "90.00": still valid JSON, still "OK"
    return httpx.Response(200, content=bytes(body), headers=response.headers)


def tampered_sign(request: httpx.Request) -> httpx.Response:
    response = ok_create(request)
    header = response.headers["Authorization"]
    sign = Pgv2Authorization.parse(header).sign
    flipped = ("1" if sign[0] == "0" else "0") + sign[1:]
    headers = dict(response.headers)
    headers["Authorization"] = header.replace(sign, flipped)
    return httpx.Response(200, content=response.content, headers=headers)


def header_missing(request: httpx.Request) -> httpx.Response:
    response = ok_create(request)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "authorization"}
    return httpx.Response(200, content=response.content, headers=headers)


def header_unparseable(request: httpx.Request) -> httpx.Response:
    response = ok_create(request)
    headers = dict(response.headers)
    headers["Authorization"] = "V2_SHA256 garbage"
    return httpx.Response(200, content=response.content, headers=headers)


def wrong_app_id(request: httpx.Request) -> httpx.Response:
    answer = fixture_json("pgv2", "refund_create_response.json")
    answer["data"].update(merchantRefundNo=JOB_ID, amount="10.00")
    return signed(request, answer, app_id="someone-else")


def wrong_secret(request: httpx.Request) -> httpx.Response:
    answer = fixture_json("pgv2", "refund_create_response.json")
    answer["data"].update(merchantRefundNo=JOB_ID, amount="10.00")
    return signed(request, answer, app_secret="not-our-secret")


def signed_for_another_url(request: httpx.Request) -> httpx.Response:
    other = httpx.Request("POST", QUERY_URL)
    answer = fixture_json("pgv2", "refund_create_response.json")
    answer["data"].update(merchantRefundNo=JOB_ID, amount="10.00")
    return signed(other, answer)


@pytest.mark.parametrize(
    "respond",
    [
        tampered_body,
        tampered_sign,
        header_missing,
        header_unparseable,
        wrong_app_id,
        wrong_secret,
        signed_for_another_url,
    ],
)
def test_tampered_pgv2_response_is_ambiguous_not_success(
    pgv2_settings: Pgv2Settings, respond: Any
) -> None:
    provider, _ = provider_with(pgv2_settings, respond)
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "BAD_RESPONSE_SIGNATURE"
    assert PGV2_APP_SECRET not in caught.value.message


def test_pgv2_verify_accepts_an_upper_case_sign_as_the_same_digest(
    pgv2_settings: Pgv2Settings,
) -> None:
    request = httpx.Request("POST", CREATE_URL, content=b"{}")
    response = signed(request, refusal("PARAM_ERROR"))
    header = response.headers["Authorization"]
    sign = Pgv2Authorization.parse(header).sign
    upper = httpx.Response(
        200,
        content=response.content,
        headers={"Authorization": header.replace(sign, sign.upper())},
        request=request,
    )
    verify_response_signature(pgv2_settings, upper)


def test_pgv2_unsigned_http_error_is_ambiguous(pgv2_settings: Pgv2Settings) -> None:
    provider, _ = provider_with(pgv2_settings, lambda request: httpx.Response(404, text="nope"))
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "BAD_RESPONSE_SIGNATURE"
    assert caught.value.http_status == 404


# ---- create codes ----


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        ("SIGN_ERROR", Outcome.FAILED),
        ("PARAM_ERROR", Outcome.DECLINED),
        ("PAYMENT_NOT_FOUND", Outcome.DECLINED),
        ("REFUND_AMOUNT_EXCEEDED", Outcome.DECLINED),
        ("PAYMENT_NOT_REFUNDABLE", Outcome.DECLINED),
    ],
)
def test_pgv2_refusal_codes_map_to_failed_or_declined_with_code_and_message(
    pgv2_settings: Pgv2Settings, code: str, outcome: Outcome
) -> None:
    provider, _ = provider_with(
        pgv2_settings, lambda request: signed(request, refusal(code, "the reason"))
    )
    result = provider.refund(refund_request())

    assert result.outcome is outcome
    assert result.code == code
    assert result.message is not None and result.message.startswith("the reason")
    assert PGV2_APP_SECRET not in result.message


def test_pgv2_nonce_reused_on_create_is_ambiguous_because_a_copy_may_have_been_applied(
    pgv2_settings: Pgv2Settings,
) -> None:
    provider, _ = provider_with(
        pgv2_settings, lambda request: signed(request, refusal("NONCE_REUSED", "seen before"))
    )
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "NONCE_REUSED"


def test_pgv2_duplicate_merchant_refund_no_is_ambiguous_never_a_decline(
    pgv2_settings: Pgv2Settings,
) -> None:
    answer = fixture_json("pgv2", "duplicate_merchant_refund_no_inferred.json")
    provider, _ = provider_with(pgv2_settings, lambda request: signed(request, answer))
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "DUPLICATE_MERCHANT_REFUND_NO"


def test_pgv2_unknown_code_is_ambiguous(pgv2_settings: Pgv2Settings) -> None:
    provider, _ = provider_with(
        pgv2_settings, lambda request: signed(request, refusal("SYSTEM_BUSY"))
    )
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "SYSTEM_BUSY"


@pytest.mark.parametrize(
    "answer",
    [
        {"code": "OK", "errorMessage": None, "data": None},
        {"code": "OK", "errorMessage": None, "data": {"paymentNo": "x"}},
        {"errorMessage": "no code"},
    ],
)
def test_pgv2_signed_answer_not_in_the_documented_shape_is_ambiguous(
    pgv2_settings: Pgv2Settings, answer: Any
) -> None:
    provider, _ = provider_with(pgv2_settings, lambda request: signed(request, answer))
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "MALFORMED_RESPONSE"


def test_pgv2_signed_malformed_json_is_ambiguous(pgv2_settings: Pgv2Settings) -> None:
    provider, _ = provider_with(
        pgv2_settings, lambda request: signed(request, None, body=b'{"code": "OK", ')
    )
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "MALFORMED_RESPONSE"


def test_pgv2_ok_about_another_merchant_refund_no_is_ambiguous(
    pgv2_settings: Pgv2Settings,
) -> None:
    provider, _ = provider_with(
        pgv2_settings, lambda request: ok_create(request, merchantRefundNo="SOMEONE-ELSE")
    )
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "MISMATCHED_RESPONSE"


def test_pgv2_ok_for_another_amount_is_unresolved(pgv2_settings: Pgv2Settings) -> None:
    provider, _ = provider_with(pgv2_settings, lambda request: ok_create(request, amount="7.00"))
    result = provider.refund(refund_request(amount=Decimal("10.00")))

    assert result.outcome is Outcome.UNRESOLVED
    assert result.settled_amount == Decimal("7.00")


# ---- status (refund inquiry) ----


def test_pgv2_status_asks_the_inquiry_by_our_merchant_refund_no_signed(
    pgv2_settings: Pgv2Settings,
) -> None:
    provider, recorder = provider_with(
        pgv2_settings,
        lambda request: ok_query(request, "SUCCESS"),
        clock_ms=lambda: "1714128828114",
        nonce=lambda: "0123456789ABCDEF0123456789ABCDEF",
    )
    provider.status(refund_request())

    (sent,) = recorder.requests
    assert str(sent.url) == QUERY_URL
    assert sent.content == b'{"merchantRefundNo":"' + JOB_ID.encode() + b'"}'
    sign = hand_pgv2_sign(
        PGV2_APP_ID,
        PGV2_APP_SECRET,
        "POST",
        QUERY_URL,
        "1714128828114",
        "0123456789ABCDEF0123456789ABCDEF",
        sent.content,
    )
    assert Pgv2Authorization.parse(sent.headers["Authorization"]).sign == sign


@pytest.mark.parametrize("status", ["PROCESSING", "SUCCESS"])
def test_pgv2_processing_or_successful_refund_is_succeeded_keeping_the_raw_status(
    pgv2_settings: Pgv2Settings, status: str
) -> None:
    provider, _ = provider_with(pgv2_settings, lambda request: ok_query(request, status))
    result = provider.status(refund_request())

    assert result.outcome is Outcome.SUCCEEDED
    assert result.raw_status == status
    assert result.provider_reference == "20240423220624300800001097000005"


def test_pgv2_failed_refund_is_declined(pgv2_settings: Pgv2Settings) -> None:
    provider, _ = provider_with(pgv2_settings, lambda request: ok_query(request, "FAILED"))
    result = provider.status(refund_request())

    assert result.outcome is Outcome.DECLINED
    assert result.raw_status == "FAILED"
    assert result.code == "REFUND_FAILED"


def test_pgv2_refund_not_found_is_not_found(pgv2_settings: Pgv2Settings) -> None:
    answer = fixture_json("pgv2", "refund_not_found_inferred.json")
    provider, _ = provider_with(pgv2_settings, lambda request: signed(request, answer))
    result = provider.status(refund_request())

    assert result.outcome is Outcome.NOT_FOUND
    assert result.code == "REFUND_NOT_FOUND"


def test_pgv2_inquiry_in_an_unknown_status_is_ambiguous(pgv2_settings: Pgv2Settings) -> None:
    provider, _ = provider_with(pgv2_settings, lambda request: ok_query(request, "REVERSED"))
    with pytest.raises(Ambiguous) as caught:
        provider.status(refund_request())
    assert caught.value.code == "UNKNOWN_STATUS"


@pytest.mark.parametrize("code", ["SIGN_ERROR", "NONCE_REUSED", "PARAM_ERROR"])
def test_pgv2_refused_inquiry_raises_not_sent(pgv2_settings: Pgv2Settings, code: str) -> None:
    provider, _ = provider_with(pgv2_settings, lambda request: signed(request, refusal(code)))
    with pytest.raises(NotSent) as caught:
        provider.status(refund_request())
    assert caught.value.code == code


def test_tampered_pgv2_inquiry_answer_is_ambiguous_not_success(
    pgv2_settings: Pgv2Settings,
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        response = ok_query(request, "SUCCESS")
        return httpx.Response(
            200, content=response.content.replace(b"10.00", b"90.00"), headers=response.headers
        )

    provider, _ = provider_with(pgv2_settings, respond)
    with pytest.raises(Ambiguous) as caught:
        provider.status(refund_request())
    assert caught.value.code == "BAD_RESPONSE_SIGNATURE"


# ---- what is refused at enqueue ----


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"amount": Decimal("1000000000000000.00")}, "15 integer digits"),
        ({"amount": Decimal("1.005")}, "2 decimals"),
        ({"amount": None}, "needs an amount"),
        ({"payment_ref": "P" * 51}, "1-50 characters"),
        ({"payment_ref": ""}, "1-50 characters"),
        ({"reason": "r" * 81}, "at most 80"),
        ({"kind": Kind.CANCEL, "amount": None}, "no cancel"),
    ],
)
def test_pgv2_validate_request_refuses_what_the_gateway_would(
    overrides: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidForGateway, match=fragment):
        Pgv2Provider.validate_request(refund_request(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"amount": Decimal("999999999999999.99")},
        {"payment_ref": "P" * 50},
        {"reason": "r" * 80},
    ],
)
def test_pgv2_validate_request_accepts_the_documented_limits(overrides: dict[str, Any]) -> None:
    Pgv2Provider.validate_request(refund_request(**overrides))
