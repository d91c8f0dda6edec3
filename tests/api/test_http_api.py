"""The shops' HTTP API over real HTTP: uvicorn in front of the database, a real Redis broker, a
prefork worker and beat, and the gateway sandbox — on SQLite and on PostgreSQL.

Every accepted request is followed to the gateway: the job's final state over HTTP and the
sandbox's ledger (what the gateway really did). Every refused one is shown to have stored
nothing: the same Idempotency-Key then makes a *new* job.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.api.support import order, refund_body, shop_client, wait_final
from tests.support.polling import wait_for
from tests.support.services import RedisServer
from tests.support.stack import REPO, Stack, unique
from worker.apikeys import new_key
from worker.db import read_session
from worker.models import Job


@dataclass
class Shop:
    stack: Stack
    key: str  # the API key of "shop-a"
    other_key: str  # the API key of "shop-b"
    keys_file: Path


@pytest.fixture(scope="module")
def shop(running: Stack) -> Iterator[Shop]:
    """The module's stack with the HTTP API up: two keys given inline (REFUNDQ_API_KEYS), and
    a keys file (REFUNDQ_API_KEYS_FILE) that starts empty, for `refundq apikey create`."""
    key_a, stored_a = new_key("shop-a")
    key_b, stored_b = new_key("shop-b")
    keys_file = running.workdir / "api-keys"
    running.start_api(
        REFUNDQ_API_KEYS=f"{stored_a.line()},{stored_b.line()}",
        REFUNDQ_API_KEYS_FILE=str(keys_file),
    )
    yield Shop(running, key_a, key_b, keys_file)


def jobs_for(payment_ref: str) -> int:
    with read_session() as session:
        return session.execute(
            select(func.count()).select_from(Job).where(Job.payment_ref == payment_ref)
        ).scalar_one()


def test_a_new_refund_is_accepted_with_202_and_reaches_the_gateway_once(shop: Shop):
    ref = order(shop.stack)
    http = shop_client(shop.stack, shop.key)

    answer = http.post(
        "/v1/refunds",
        json=refund_body(ref, "50.00", original_amount="100.00", reason="Customer request"),
        headers={"Idempotency-Key": "refund-1"},
    )

    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert (job["amount"], job["original_amount"], job["currency"]) == ("50.00", "100.00", "USD")
    assert job["idempotency_key"] == "shop-a/refund-1"  # scoped by the API key's name
    done = wait_final(http, job["id"])
    assert done["status"] == "succeeded"
    ledger = shop.stack.sandbox.ledger("vai247", ref)
    assert [entry["amount"] for entry in ledger] == ["50.00"]
    assert done["provider_reference"] == ledger[0]["reference"]


def test_a_replay_of_the_same_key_and_body_answers_200_with_the_same_job(shop: Shop):
    ref = order(shop.stack)
    http = shop_client(shop.stack, shop.key)
    body = refund_body(ref, "30.00")
    key = unique("replay")

    first = http.post("/v1/refunds", json=body, headers={"Idempotency-Key": key})
    again = http.post("/v1/refunds", json=body, headers={"Idempotency-Key": key})
    # The same request written differently (field order, trailing zero) is the same request.
    reordered = {"currency": "USD", "amount": "30.0", "payment_ref": ref, "provider": "vai247"}
    third = http.post("/v1/refunds", json=reordered, headers={"Idempotency-Key": key})

    assert first.status_code == 202, first.text
    assert (again.status_code, third.status_code) == (200, 200), (again.text, third.text)
    assert again.json()["id"] == third.json()["id"] == first.json()["id"]
    done = wait_final(http, first.json()["id"])
    assert done["status"] == "succeeded"
    # Replayed after the job finished: still 200, the same job, as it is now.
    late = http.post("/v1/refunds", json=body, headers={"Idempotency-Key": key})
    assert late.status_code == 200
    assert (late.json()["id"], late.json()["status"]) == (done["id"], "succeeded")
    assert len(shop.stack.sandbox.ledger("vai247", ref)) == 1
    assert jobs_for(ref) == 1


def test_the_same_key_with_a_different_body_is_a_409_naming_the_key(shop: Shop):
    ref = order(shop.stack)
    http = shop_client(shop.stack, shop.key)
    key = unique("conflict")
    first = http.post(
        "/v1/refunds", json=refund_body(ref, "50.00"), headers={"Idempotency-Key": key}
    )
    assert first.status_code == 202, first.text

    conflict = http.post(
        "/v1/refunds", json=refund_body(ref, "40.00"), headers={"Idempotency-Key": key}
    )

    assert conflict.status_code == 409, conflict.text
    error = conflict.json()["error"]
    assert error["type"] == "idempotency_conflict"
    assert error["idempotency_key"] == key
    assert error["job_id"] == first.json()["id"]
    assert key in error["message"]
    # A cancel under a refund's key is a different request too.
    cancel = http.post(
        "/v1/cancellations",
        json={"provider": "vai247", "payment_ref": ref},
        headers={"Idempotency-Key": key},
    )
    assert cancel.status_code == 409
    assert wait_final(http, first.json()["id"])["status"] == "succeeded"
    assert [e["amount"] for e in shop.stack.sandbox.ledger("vai247", ref)] == ["50.00"]
    assert jobs_for(ref) == 1


def test_idempotency_keys_are_scoped_per_api_key_name(shop: Shop):
    key = unique("shared")
    shop_a, shop_b = shop_client(shop.stack, shop.key), shop_client(shop.stack, shop.other_key)
    ref_a, ref_b = order(shop.stack), order(shop.stack)

    a = shop_a.post("/v1/refunds", json=refund_body(ref_a), headers={"Idempotency-Key": key})
    b = shop_b.post("/v1/refunds", json=refund_body(ref_b), headers={"Idempotency-Key": key})

    assert (a.status_code, b.status_code) == (202, 202), (a.text, b.text)
    assert a.json()["id"] != b.json()["id"]
    assert (a.json()["idempotency_key"], b.json()["idempotency_key"]) == (
        f"shop-a/{key}",
        f"shop-b/{key}",
    )
    assert wait_final(shop_a, a.json()["id"])["status"] == "succeeded"
    assert wait_final(shop_b, b.json()["id"])["status"] == "succeeded"
    assert len(shop.stack.sandbox.ledger("vai247", ref_a)) == 1
    assert len(shop.stack.sandbox.ledger("vai247", ref_b)) == 1


BAD_REFUNDS: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, changes to a good body, field, words the message must contain)
    ("float amount", {"amount": 50.5}, "amount", "must be a JSON string"),
    ("integer amount", {"amount": 50}, "amount", "float cannot hold money"),
    ("float original amount", {"original_amount": 80.0}, "original_amount", "JSON string"),
    ("missing amount", {"amount": None}, "amount", "is required"),
    ("negative amount", {"amount": "-5.00"}, "amount", "greater than zero"),
    ("too many decimals", {"amount": "5.001"}, "amount", "USD has 2"),
    ("exponent", {"amount": "1e3"}, "amount", "is not an amount"),
    ("not a currency", {"currency": "ABC"}, "currency", "not an ISO 4217 currency"),
    ("over the original", {"original_amount": "10.00"}, "amount", "more than the original"),
    ("unknown provider", {"provider": "paypal"}, "provider", "unknown provider"),
    ("unknown field", {"amount_cents": "5000"}, "amount_cents", "is not a field of a refund"),
    ("extra of another gateway", {"extras": {"order_id": "1"}}, "extras.order_id", "vai247"),
    ("not a URL", {"notify_url": "shop.example/hook"}, "notify_url", "http(s) URL"),
    ("number as text field", {"payment_ref": 12345}, "payment_ref", "must be a string"),
]


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [pytest.param(c, f, w, id=case) for case, c, f, w in BAD_REFUNDS],
)
def test_bad_input_is_a_422_naming_the_field_and_stores_nothing(
    shop: Shop, changes: dict[str, Any], field: str, words: str
):
    ref = order(shop.stack)
    http = shop_client(shop.stack, shop.key)
    key = unique("bad")
    body = {k: v for k, v in {**refund_body(ref), **changes}.items() if v is not None}

    answer = http.post("/v1/refunds", json=body, headers={"Idempotency-Key": key})

    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["field"]) == ("invalid_request", field), error
    assert words in error["message"], error
    assert jobs_for(ref) == 0
    # Nothing was stored under the key either: the corrected request is a new job (202).
    fixed = http.post("/v1/refunds", json=refund_body(ref), headers={"Idempotency-Key": key})
    assert fixed.status_code == 202, fixed.text
    assert wait_final(http, fixed.json()["id"])["status"] == "succeeded"
    assert len(shop.stack.sandbox.ledger("vai247", ref)) == 1


@pytest.mark.parametrize(
    ("path", "body", "headers", "field", "words"),
    [
        pytest.param(
            "/v1/refunds", "GOOD", {}, "Idempotency-Key", "header is required", id="no-key"
        ),
        pytest.param(
            "/v1/refunds",
            "GOOD",
            {"Idempotency-Key": "tab\tinside"},
            "Idempotency-Key",
            "printable ASCII",
            id="key-with-a-tab",
        ),
        pytest.param(
            "/v1/refunds",
            "GOOD",
            {"Idempotency-Key": "k" * 201},
            "Idempotency-Key",
            "the limit is 200",
            id="long-key",
        ),
        pytest.param("/v1/refunds", b"{not json", None, "body", "is not valid JSON", id="not-json"),
        pytest.param("/v1/refunds", b"[1, 2]", None, "body", "JSON object", id="array"),
        pytest.param(
            "/v1/cancellations",
            "CANCEL_WITH_AMOUNT",
            None,
            "amount",
            "a cancel has no amount",
            id="cancel-with-amount",
        ),
    ],
)
def test_malformed_requests_are_422_with_a_precise_message(
    shop: Shop, path: str, body: Any, headers: dict[str, str] | None, field: str, words: str
):
    ref = order(shop.stack, status="pending")
    http = shop_client(shop.stack, shop.key)
    key = unique("malformed")
    request_headers = {"Idempotency-Key": key} if headers is None else headers
    if body == "GOOD":
        answer = http.post(path, json=refund_body(ref), headers=request_headers)
    elif body == "CANCEL_WITH_AMOUNT":
        cancel = {"provider": "vai247", "payment_ref": ref, "amount": "5.00"}
        answer = http.post(path, json=cancel, headers=request_headers)
    else:
        answer = http.post(
            path, content=body, headers={**request_headers, "Content-Type": "application/json"}
        )

    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["field"]) == ("invalid_request", field), error
    assert words in error["message"], error
    assert jobs_for(ref) == 0
    # The worker is there all along: the corrected cancellation reaches the gateway.
    fixed = http.post(
        "/v1/cancellations",
        json={"provider": "vai247", "payment_ref": ref},
        headers={"Idempotency-Key": key},
    )
    assert fixed.status_code == 202, fixed.text
    done = wait_final(http, fixed.json()["id"])
    assert (done["status"], done["raw_status"]) == ("succeeded", "cancelled")


@pytest.mark.parametrize(
    ("authorization", "why"),
    [
        pytest.param(None, "send an API key", id="missing"),
        pytest.param("Bearer rq_0123456789ab_" + "x" * 40, "not valid", id="unknown-key"),
        pytest.param("Bearer not-a-refundq-key", "not valid", id="garbage"),
        pytest.param("Basic c2hvcDpwYXNzd29yZA==", "send an API key", id="basic-auth"),
        pytest.param("WRONG_OF_SHOP_A", "not valid", id="shop-a-key-one-char-off"),
    ],
)
def test_requests_without_a_valid_api_key_are_401_and_store_nothing(
    shop: Shop, authorization: str | None, why: str
):
    ref = order(shop.stack)
    key = unique("auth")
    if authorization == "WRONG_OF_SHOP_A":
        last = shop.key[-1]
        authorization = "Bearer " + shop.key[:-1] + ("A" if last != "A" else "B")
    headers = {
        "Idempotency-Key": key,
        **({"Authorization": authorization} if authorization else {}),
    }
    anonymous = shop_client(shop.stack, None)

    answer = anonymous.post("/v1/refunds", json=refund_body(ref), headers=headers)
    # Without a valid key even a bad body is 401: the key is checked first.
    bad_body = anonymous.post("/v1/refunds", json=refund_body(ref, 50.5), headers=headers)
    reading = anonymous.get("/v1/jobs", headers=headers)

    for refused in (answer, bad_body, reading):
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["error"]["type"] == "unauthorized"
        assert why in refused.json()["error"]["message"]
    assert jobs_for(ref) == 0
    # With shop-a's key the very same request is a new job, and reaches the gateway.
    http = shop_client(shop.stack, shop.key)
    accepted = http.post("/v1/refunds", json=refund_body(ref), headers={"Idempotency-Key": key})
    assert accepted.status_code == 202, accepted.text
    assert wait_final(http, accepted.json()["id"])["status"] == "succeeded"
    assert len(shop.stack.sandbox.ledger("vai247", ref)) == 1


def test_reading_jobs_needs_a_key_and_an_unknown_job_is_404(shop: Shop):
    http = shop_client(shop.stack, shop.key)
    ref = order(shop.stack)
    job = http.post("/v1/refunds", json=refund_body(ref), headers={"Idempotency-Key": unique("r")})
    done = wait_final(http, job.json()["id"])

    assert shop_client(shop.stack, None).get(f"/v1/jobs/{done['id']}").status_code == 401
    missing = http.get("/v1/jobs/0123456789abcdef0123456789abcdef")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    # The HTTP view is the Python API's view.
    from worker.client import get_job

    assert done == get_job(done["id"]).model_dump(mode="json")


def test_job_lists_page_through_every_job_once_newest_first(shop: Shop):
    http = shop_client(shop.stack, shop.key)
    created = []
    for _ in range(7):
        ref = order(shop.stack, amount="10.00")
        answer = http.post(
            "/v1/refunds", json=refund_body(ref, "10.00"), headers={"Idempotency-Key": unique("p")}
        )
        assert answer.status_code == 202
        created.append(answer.json()["id"])
    for job_id in created:
        assert wait_final(http, job_id)["status"] == "succeeded"

    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, "provider": "vai247"}
        if cursor:
            params["after"] = cursor
        page = http.get("/v1/jobs", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["jobs"]) <= 3
        seen += [job["id"] for job in body["jobs"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break

    from worker.client import list_jobs

    everything = [view.id for view in list_jobs(provider="vai247", limit=1000)]
    assert seen == everything  # each job once, newest first, nothing skipped
    assert pages == -(-len(everything) // 3)
    assert [job_id for job_id in seen if job_id in created] == created[::-1]
    succeeded = http.get("/v1/jobs", params={"status": "succeeded", "limit": 200}).json()
    assert {job["status"] for job in succeeded["jobs"]} == {"succeeded"}
    assert set(created) <= {job["id"] for job in succeeded["jobs"]}
    assert http.get("/v1/jobs", params={"provider": "pgv2"}).json() == {"jobs": [], "next": None}
    for params, field in [
        ({"status": "done"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"after": "no-such-job"}, "after"),
    ]:
        refused = http.get("/v1/jobs", params=params)
        assert refused.status_code == 422, (params, refused.text)
        assert refused.json()["error"]["field"] == field


def test_apikey_create_prints_the_key_last_and_the_api_accepts_it_until_revoked(shop: Shop):
    stack = shop.stack
    env = stack.child_env(REFUNDQ_API_KEYS_FILE=str(shop.keys_file))

    made = subprocess.run(
        [sys.executable, "-m", "worker.cli", "apikey", "create", "shop-c"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("rq_") and len(key) > 40
    assert key not in made.stderr
    stored = shop.keys_file.read_text()
    assert stored.startswith("shop-c:") and key not in stored  # only its hash is kept
    assert oct(shop.keys_file.stat().st_mode & 0o777) == "0o600"
    # The running API reads the changed file; no restart.
    http = shop_client(stack, key)
    ref = order(stack)
    answer = http.post("/v1/refunds", json=refund_body(ref), headers={"Idempotency-Key": "c-1"})
    assert answer.status_code == 202, answer.text
    assert answer.json()["idempotency_key"] == "shop-c/c-1"
    assert wait_final(http, answer.json()["id"])["status"] == "succeeded"
    assert len(stack.sandbox.ledger("vai247", ref)) == 1
    listed = subprocess.run(
        [sys.executable, "-m", "worker.cli", "apikey", "list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "shop-c" in listed.stdout and key.split("_")[1] in listed.stdout
    assert key not in listed.stdout

    # Revoked by deleting its line: refused at once.
    shop.keys_file.write_text("# shop-c revoked\n")
    wait_for(
        lambda: http.get(f"/v1/jobs/{answer.json()['id']}").status_code == 401,
        timeout=10,
        message="the revoked key to be refused",
    )


def test_openapi_health_and_metrics_need_no_key(shop: Shop):
    anonymous = shop_client(shop.stack, None)

    spec = anonymous.get("/openapi.json").json()
    health = anonymous.get("/healthz")
    metrics = anonymous.get("/metrics")

    for path in ("/v1/refunds", "/v1/cancellations", "/v1/jobs", "/v1/jobs/{job_id}", "/metrics"):
        assert path in spec["paths"], path
    refund = spec["paths"]["/v1/refunds"]["post"]
    assert {"202", "200", "401", "409", "422"} <= set(refund["responses"])
    assert (
        refund["requestBody"]["content"]["application/json"]["schema"]["properties"]["amount"][
            "type"
        ]
        == "string"
    )
    assert [p["name"] for p in refund["parameters"]] == ["Idempotency-Key"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert (health.status_code, health.json()) == (200, {"database": "ok", "broker": "ok"})
    assert metrics.status_code == 200 and "refundq_jobs" in metrics.text


def test_healthz_says_which_of_the_database_and_the_broker_is_down(stack_factory, tmp_path):
    broker = RedisServer(tmp_path / "redis")  # a broker of its own, to stop
    broker.start()
    try:
        stack: Stack = stack_factory(redis=broker)
        api = stack.start_api()
        assert httpx.get(f"{stack.api_url}/healthz", timeout=20).json() == {
            "database": "ok",
            "broker": "ok",
        }

        broker.stop()
        broker_down = httpx.get(f"{stack.api_url}/healthz", timeout=20)

        assert broker_down.status_code == 503
        assert broker_down.json()["database"] == "ok"
        assert broker_down.json()["broker"].startswith("down:")
        broker.start()
        stack.stop(api)
        nowhere = f"sqlite:///{tmp_path / 'no-such-dir' / 'refundq.db'}"
        stack.start_api(REFUNDQ_DATABASE_URL=nowhere)
        database_down = httpx.get(f"{stack.api_url}/healthz", timeout=20)
        assert database_down.status_code == 503
        assert database_down.json()["database"].startswith("down:")
        assert database_down.json()["broker"] == "ok"
        # The metrics say so too, instead of failing the scrape.
        metrics = httpx.get(f"{stack.api_url}/metrics", timeout=20)
        assert metrics.status_code == 200 and "refundq_database_up 0.0" in metrics.text
    finally:
        broker.stop()
