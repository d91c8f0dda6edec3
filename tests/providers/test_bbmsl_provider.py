"""bbmsl provider: the signed envelope on the wire, and every answer mapped to an outcome."""

from __future__ import annotations

import base64
import copy
import json
from decimal import Decimal
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import providers.bbmsl as bbmsl_module
from providers.base import Ambiguous, InvalidForGateway, Kind, NotSent, Outcome
from providers.bbmsl import (
    BbmslEnvelope,
    BbmslErrorResponse,
    BbmslProvider,
    BbmslQueryResponse,
    BbmslRefundRequest,
    BbmslRefundResponse,
    BbmslSettings,
)
from tests.providers.conftest import BBMSL_BASE_URL
from tests.providers.helpers import (
    Recorder,
    assert_round_trip,
    fixture_json,
    json_response,
    refund_request,
)

REFUND_URL = f"{BBMSL_BASE_URL}/hosted-checkout/refund"
QUERY_URL = f"{BBMSL_BASE_URL}/hosted-checkout/query"


def seed_refund_answer(**changes: Any) -> dict[str, Any]:
    """The seed's own refund answer (order 15.00, refunded 10), with `changes` applied to its
    order (`order_*`) and transaction (`transaction_*`)."""
    answer: dict[str, Any] = copy.deepcopy(fixture_json("bbmsl", "refund_response.json"))
    for key, value in changes.items():
        part, _, name = key.partition("_")
        if value is None:
            answer[part].pop(name, None)
        else:
            answer[part][name] = value
    return answer


def query_answer(status: str, amount: str = "15.00", net_amount: str = "5.00") -> dict[str, Any]:
    answer: dict[str, Any] = copy.deepcopy(fixture_json("bbmsl", "query_response_inferred.json"))
    answer["order"].update(status=status, amount=Decimal(amount), netAmount=Decimal(net_amount))
    return answer


def provider_answering(
    settings: BbmslSettings, payload: dict[str, Any], status: int = 200
) -> tuple[BbmslProvider, Recorder]:
    recorder = Recorder(lambda request: json_response(status, payload))
    return BbmslProvider(settings, recorder.client()), recorder


def sent_envelope(request: httpx.Request) -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(request.content)
    return envelope


def verify(public_key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> None:
    public_key.verify(base64.b64decode(signature_b64), message, padding.PKCS1v15(), hashes.SHA256())


# ---- contract fixtures (seed 001 and inferred shapes) ----


def test_bbmsl_seed_refund_response_round_trips_through_the_response_model() -> None:
    parsed = assert_round_trip(BbmslRefundResponse, fixture_json("bbmsl", "refund_response.json"))
    assert parsed.order.amount == Decimal("15.00")
    assert parsed.order.net_amount == Decimal("5.00")
    assert isinstance(parsed.transaction.amount, Decimal)


def test_bbmsl_seed_refund_request_envelope_parses_and_its_inner_request_fits_our_model() -> None:
    envelope = assert_round_trip(BbmslEnvelope, fixture_json("bbmsl", "refund_request.json"))
    inner = json.loads(envelope.request, parse_float=Decimal)
    assert inner == {"merchantId": 3, "orderId": 4922, "amount": 10}
    assert_round_trip(BbmslRefundRequest, inner)


def test_bbmsl_inferred_query_and_error_fixtures_round_trip() -> None:
    assert_round_trip(BbmslQueryResponse, fixture_json("bbmsl", "query_response_inferred.json"))
    assert_round_trip(BbmslErrorResponse, fixture_json("bbmsl", "error_response_inferred.json"))


# ---- the request on the wire ----


def test_bbmsl_refund_is_a_signed_envelope_that_verifies_with_the_public_key_alone(
    bbmsl_settings: BbmslSettings, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    provider, recorder = provider_answering(bbmsl_settings, seed_refund_answer())
    provider.refund(refund_request(payment_ref="ORDER-1001", amount=Decimal("10")))

    (sent,) = recorder.requests
    assert str(sent.url) == REFUND_URL
    assert sent.method == "POST"
    assert sent.headers["Content-Type"] == "application/json"
    envelope = sent_envelope(sent)
    assert set(envelope) == {"request", "signature"}
    # merchantId a number (as in the seed's signed example), amount with exactly two decimals.
    assert envelope["request"] == '{"merchantId":3,"merchantReference":"ORDER-1001","amount":10.00}'

    # Independent verification: only the PEM-serialised public key, as BBMSL would hold it.
    public_key = serialization.load_pem_public_key(
        bbmsl_private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert isinstance(public_key, rsa.RSAPublicKey)
    message = envelope["request"].encode("utf-8")
    verify(public_key, message, envelope["signature"])

    tampered_message = bytearray(message)
    tampered_message[-3] ^= 0x01  # one byte of the amount
    with pytest.raises(InvalidSignature):
        verify(public_key, bytes(tampered_message), envelope["signature"])

    signature = bytearray(base64.b64decode(envelope["signature"]))
    signature[0] ^= 0x01
    with pytest.raises(InvalidSignature):
        verify(public_key, message, base64.b64encode(bytes(signature)).decode())


def test_bbmsl_signed_request_text_is_byte_identical_to_the_request_field_sent(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, recorder = provider_answering(bbmsl_settings, seed_refund_answer())
    provider.refund(refund_request(payment_ref="Réf-ü-1", amount=Decimal("10")))

    envelope = sent_envelope(recorder.requests[0])
    # Non-ASCII survives unescaped in the signed text and comes back identical from the JSON.
    assert '"merchantReference":"Réf-ü-1"' in envelope["request"]
    expected_signature = bbmsl_module.sign_request(provider._key, envelope["request"])
    assert envelope["signature"] == expected_signature


@pytest.mark.parametrize(
    ("amount", "wire"),
    [("10", "10.00"), ("10.5", "10.50"), ("0.01", "0.01"), ("999999999.99", "999999999.99")],
)
def test_bbmsl_amount_is_a_json_number_with_exactly_two_decimals(
    bbmsl_settings: BbmslSettings, amount: str, wire: str
) -> None:
    answer = seed_refund_answer(transaction_amount=Decimal(amount))
    provider, recorder = provider_answering(bbmsl_settings, answer)
    provider.refund(refund_request(amount=Decimal(amount)))

    inner = sent_envelope(recorder.requests[0])["request"]
    assert inner.endswith(f'"amount":{wire}}}')
    assert json.loads(inner, parse_float=Decimal)["amount"] == Decimal(wire)


def test_bbmsl_order_id_extra_names_the_order_by_number_instead_of_merchant_reference(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, recorder = provider_answering(bbmsl_settings, seed_refund_answer())
    provider.refund(refund_request(extras={"order_id": "4922"}, amount=Decimal("10")))

    inner = sent_envelope(recorder.requests[0])["request"]
    assert inner == '{"merchantId":3,"orderId":4922,"amount":10.00}'


def test_bbmsl_private_key_is_parsed_once_per_provider_not_per_request(
    bbmsl_settings: BbmslSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = bbmsl_module.load_private_key

    def counting(pem: Any) -> rsa.RSAPrivateKey:
        calls.append(1)
        return real(pem)

    monkeypatch.setattr(bbmsl_module, "load_private_key", counting)
    provider, _ = provider_answering(bbmsl_settings, seed_refund_answer())
    for _ in range(3):
        provider.refund(refund_request(amount=Decimal("10")))
    provider.status(refund_request(amount=Decimal("10")))
    assert len(calls) == 1


# ---- refund answers ----


def test_bbmsl_seed_success_answer_is_succeeded_with_the_refund_transaction_id(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, _ = provider_answering(bbmsl_settings, seed_refund_answer())
    result = provider.refund(refund_request(amount=Decimal("10.00")))

    assert result.outcome is Outcome.SUCCEEDED
    assert result.provider_reference == "3758"
    assert result.raw_status == "SUCCESS/REFUNDED"
    assert result.settled_amount == Decimal("10")
    assert result.code == "0000"


@pytest.mark.parametrize(
    ("code", "message", "outcome"),
    [
        ("1001", "Invalid signature", Outcome.FAILED),
        ("1002", "Invalid merchant", Outcome.FAILED),
        ("2001", "Invalid request", Outcome.DECLINED),
        ("3001", "Order not found", Outcome.DECLINED),
        ("3002", "Order already refunded", Outcome.DECLINED),
        ("3003", "Refund amount exceeds order amount", Outcome.DECLINED),
        ("3004", "Insufficient unsettled balance", Outcome.DECLINED),
        ("3005", "Order not refundable", Outcome.DECLINED),
    ],
)
def test_bbmsl_refusal_codes_map_to_failed_for_our_faults_and_declined_for_business(
    bbmsl_settings: BbmslSettings, code: str, message: str, outcome: Outcome
) -> None:
    provider, _ = provider_answering(bbmsl_settings, {"responseCode": code, "message": message})
    result = provider.refund(refund_request())

    assert result.outcome is outcome
    assert result.code == code
    assert result.message is not None and result.message.startswith(message)
    assert result.provider_reference is None


def test_bbmsl_failed_signature_code_tells_the_operator_which_variable_to_check(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, _ = provider_answering(
        bbmsl_settings, {"responseCode": "1001", "message": "Invalid signature"}
    )
    result = provider.refund(refund_request())
    assert result.message is not None and "REFUNDQ_BBMSL_PRIVATE_KEY_FILE" in result.message


def test_bbmsl_unknown_response_code_is_ambiguous_never_a_refusal(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, _ = provider_answering(
        bbmsl_settings, {"responseCode": "9999", "message": "System busy"}
    )
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "9999"


def test_bbmsl_declined_refund_transaction_is_declined(bbmsl_settings: BbmslSettings) -> None:
    answer = seed_refund_answer(transaction_status="DECLINED", order_status="SUCCESS")
    provider, _ = provider_answering(bbmsl_settings, answer)
    result = provider.refund(refund_request(amount=Decimal("10")))

    assert result.outcome is Outcome.DECLINED
    assert result.code == "TRANSACTION_DECLINED"
    assert result.raw_status == "DECLINED/SUCCESS"


@pytest.mark.parametrize(
    "changes",
    [
        {"transaction_status": "VOIDED"},
        {"transaction_status": "SOMETHING_NEW"},
        {"transaction_type": "SALE"},
    ],
)
def test_bbmsl_success_code_with_a_transaction_we_cannot_read_is_ambiguous(
    bbmsl_settings: BbmslSettings, changes: dict[str, str]
) -> None:
    provider, _ = provider_answering(bbmsl_settings, seed_refund_answer(**changes))
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request(amount=Decimal("10")))
    assert caught.value.code == "UNKNOWN_STATUS"


@pytest.mark.parametrize(
    "answer",
    [
        {"responseCode": "0000", "message": "Success"},  # no order, no transaction
        {"responseCode": "0000", "order": {"id": 1}, "transaction": {"id": 2}},
        {"message": "no code at all"},
        {"responseCode": 0},  # wrong type
    ],
)
def test_bbmsl_answer_not_in_the_documented_shape_is_ambiguous(
    bbmsl_settings: BbmslSettings, answer: dict[str, Any]
) -> None:
    provider, _ = provider_answering(bbmsl_settings, answer)
    with pytest.raises(Ambiguous) as caught:
        provider.refund(refund_request())
    assert caught.value.code == "MALFORMED_RESPONSE"


def test_bbmsl_refund_of_another_amount_than_ours_is_unresolved_for_a_human(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, _ = provider_answering(bbmsl_settings, seed_refund_answer())  # refunded 10
    result = provider.refund(refund_request(amount=Decimal("7.00")))

    assert result.outcome is Outcome.UNRESOLVED
    assert result.settled_amount == Decimal("10")
    assert result.message is not None and "resolve the job by hand" in result.message


def test_bbmsl_http_404_without_a_response_code_is_failed_configuration(
    bbmsl_settings: BbmslSettings,
) -> None:
    recorder = Recorder(lambda request: httpx.Response(404, text="<html>Not Found</html>"))
    result = BbmslProvider(bbmsl_settings, recorder.client()).refund(refund_request())

    assert result.outcome is Outcome.FAILED
    assert result.code == "HTTP_404"
    assert result.message is not None and "REFUNDQ_BBMSL_BASE_URL" in result.message


def test_bbmsl_redirect_is_ambiguous(bbmsl_settings: BbmslSettings) -> None:
    recorder = Recorder(
        lambda request: httpx.Response(302, headers={"Location": "https://elsewhere.test/"})
    )
    with pytest.raises(Ambiguous):
        BbmslProvider(bbmsl_settings, recorder.client()).refund(refund_request())


# ---- status (order query) ----


def test_bbmsl_status_queries_the_order_by_our_reference_with_a_signed_envelope(
    bbmsl_settings: BbmslSettings, bbmsl_private_key: rsa.RSAPrivateKey
) -> None:
    provider, recorder = provider_answering(bbmsl_settings, query_answer("REFUNDED"))
    provider.status(refund_request(payment_ref="ORDER-1001", amount=Decimal("10")))

    (sent,) = recorder.requests
    assert str(sent.url) == QUERY_URL
    envelope = sent_envelope(sent)
    assert envelope["request"] == '{"merchantId":3,"merchantReference":"ORDER-1001"}'
    verify(bbmsl_private_key.public_key(), envelope["request"].encode(), envelope["signature"])


def test_bbmsl_order_refunded_by_exactly_our_amount_is_succeeded(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, _ = provider_answering(bbmsl_settings, query_answer("REFUNDED"))
    result = provider.status(refund_request(amount=Decimal("10.00")))

    assert result.outcome is Outcome.SUCCEEDED
    assert result.settled_amount == Decimal("10.00")
    assert result.raw_status == "REFUNDED"


def test_bbmsl_order_refunded_by_another_amount_is_unresolved_with_an_actionable_message(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, _ = provider_answering(bbmsl_settings, query_answer("REFUNDED", net_amount="12.00"))
    result = provider.status(refund_request(amount=Decimal("10.00")))

    assert result.outcome is Outcome.UNRESOLVED
    assert result.settled_amount == Decimal("3.00")
    assert result.message is not None
    assert "REFUNDED by 3.00" in result.message and "asked 10.00" in result.message
    assert "resolve the job by hand" in result.message


@pytest.mark.parametrize("status", ["SUCCESS", "SETTLED", "OPEN"])
def test_bbmsl_order_not_refunded_means_our_refund_was_not_found(
    bbmsl_settings: BbmslSettings, status: str
) -> None:
    provider, _ = provider_answering(bbmsl_settings, query_answer(status, net_amount="15.00"))
    result = provider.status(refund_request())

    assert result.outcome is Outcome.NOT_FOUND
    assert result.raw_status == status


@pytest.mark.parametrize("status", ["VOIDED", "CLOSED"])
def test_bbmsl_voided_or_closed_order_is_unresolved_not_declined(
    bbmsl_settings: BbmslSettings, status: str
) -> None:
    provider, _ = provider_answering(bbmsl_settings, query_answer(status))
    result = provider.status(refund_request())

    assert result.outcome is Outcome.UNRESOLVED
    assert result.message is not None and "BBMSL portal" in result.message


def test_bbmsl_order_in_an_unknown_status_is_ambiguous(bbmsl_settings: BbmslSettings) -> None:
    provider, _ = provider_answering(bbmsl_settings, query_answer("ARCHIVED"))
    with pytest.raises(Ambiguous):
        provider.status(refund_request())


def test_bbmsl_status_of_an_unknown_order_is_declined_with_the_code_not_not_found(
    bbmsl_settings: BbmslSettings,
) -> None:
    provider, _ = provider_answering(
        bbmsl_settings, {"responseCode": "3001", "message": "Order not found"}
    )
    result = provider.status(refund_request())

    assert result.outcome is Outcome.DECLINED
    assert result.code == "3001"
    assert result.message == "Order not found"


@pytest.mark.parametrize("code", ["1001", "1002"])
def test_bbmsl_status_refused_for_our_credentials_raises_not_sent_saying_nothing_of_the_refund(
    bbmsl_settings: BbmslSettings, code: str
) -> None:
    provider, _ = provider_answering(bbmsl_settings, {"responseCode": code, "message": "no"})
    with pytest.raises(NotSent) as caught:
        provider.status(refund_request())
    assert caught.value.code == code


def test_bbmsl_status_with_a_refund_only_code_is_ambiguous(bbmsl_settings: BbmslSettings) -> None:
    provider, _ = provider_answering(
        bbmsl_settings, {"responseCode": "3004", "message": "Insufficient unsettled balance"}
    )
    with pytest.raises(Ambiguous):
        provider.status(refund_request())


# ---- what is refused at enqueue ----


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"amount": Decimal("1000000000.00")}, "9 integer digits"),
        ({"amount": Decimal("10.001")}, "2 decimals"),
        ({"amount": None}, "needs an amount"),
        ({"payment_ref": "R" * 65}, "1-64 characters"),
        ({"extras": {"order_id": "49x22"}}, "positive whole number"),
        ({"extras": {"order_id": "0"}}, "positive whole number"),
        ({"kind": Kind.CANCEL, "amount": None}, "no cancel"),
    ],
)
def test_bbmsl_validate_request_refuses_what_the_gateway_would(
    overrides: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidForGateway, match=fragment):
        BbmslProvider.validate_request(refund_request(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"amount": Decimal("999999999.99")},
        {"amount": Decimal("0.01")},
        {"payment_ref": "R" * 64},
        {"payment_ref": "R" * 100, "extras": {"order_id": "4922"}},
    ],
)
def test_bbmsl_validate_request_accepts_the_documented_limits(overrides: dict[str, Any]) -> None:
    BbmslProvider.validate_request(refund_request(**overrides))
