"""Bad input at enqueue: a clear error, nothing stored, nothing published — through the Python
API and the CLI (exit code 2), on SQLite and PostgreSQL. No worker runs, so anything published
would still sit in the broker's queue."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from tests.support.stack import REPO, Stack, unique
from worker.client import enqueue_refund
from worker.db import read_session
from worker.errors import InvalidRequest
from worker.models import Job

VALID = {
    "provider": "vai247",
    "payment_ref": "ord_valid",
    "amount": "50.00",
    "currency": "USD",
    "idempotency_key": "k",
}

BAD_INPUT = [
    ({"amount": "50.001"}, "amount: 50.001 has 3 decimal places; USD has 2"),
    ({"amount": "-1"}, "amount: '-1' must be greater than zero"),
    ({"amount": "0"}, "amount: '0' must be greater than zero"),
    ({"amount": "NaN"}, "amount: 'NaN' is not an amount"),
    ({"amount": "1e3"}, "amount: '1e3' is not an amount"),
    ({"amount": ""}, "amount: is required for a refund"),
    ({"currency": "XXX"}, "currency: XXX is not a currency used for payments"),
    ({"currency": "usd1"}, "currency: 'usd1' is not a currency code"),
    ({"provider": "paypal"}, "provider: unknown provider 'paypal'; known:"),
    ({"idempotency_key": ""}, "idempotency_key: must not be empty"),
    ({"payment_ref": ""}, "payment_ref: must not be empty"),
    ({"original_amount": "40.00"}, "amount: 50.00 USD is more than the original amount 40.00"),
]


def nothing_stored_or_published(stack: Stack) -> None:
    with read_session() as session:
        assert session.execute(select(func.count()).select_from(Job)).scalar_one() == 0
    assert stack.broker().llen("refundq") == 0


@pytest.fixture
def idle(stack_factory) -> Stack:
    stack: Stack = stack_factory()
    stack.broker().delete("refundq")
    return stack


@pytest.mark.parametrize(("change", "message"), BAD_INPUT)
def test_bad_input_through_the_python_api_is_refused_and_leaves_no_trace(idle, change, message):
    with pytest.raises(InvalidRequest) as caught:
        enqueue_refund(**{**VALID, **change})
    assert message in str(caught.value)
    nothing_stored_or_published(idle)


def cli(stack: Stack, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO,
        env={**stack.child_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_args(request: dict[str, str]) -> list[str]:
    args = ["enqueue", "refund"]
    for name in (
        "provider",
        "payment_ref",
        "amount",
        "currency",
        "idempotency_key",
        "original_amount",
    ):
        if name in request:
            args += [f"--{name.replace('_', '-')}", request[name]]
    return args


@pytest.mark.parametrize(("change", "message"), BAD_INPUT)
def test_bad_input_through_the_cli_exits_2_with_the_reason(idle, change, message):
    result = cli(idle, *cli_args({**VALID, **change}))
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split())
    nothing_stored_or_published(idle)


def test_a_refund_above_the_original_is_refused_by_the_cli_with_no_job_row(idle):
    ref = unique("ord")
    first = cli(
        idle,
        *cli_args({**VALID, "payment_ref": ref, "amount": "70.00", "original_amount": "100.00"}),
        "--json",
    )
    assert first.returncode == 0, first.stderr
    job = json.loads(first.stdout)
    assert (job["status"], job["amount"], job["original_amount"]) == ("queued", "70.00", "100.00")

    over = cli(
        idle, *cli_args({**VALID, "payment_ref": ref, "amount": "30.01", "idempotency_key": "k2"})
    )

    assert over.returncode == 2
    assert "above the original 100.00" in " ".join(over.stderr.split())
    with read_session() as session:
        refs = session.execute(select(Job.idempotency_key).where(Job.payment_ref == ref)).all()
    assert [r[0] for r in refs] == ["k"]


def test_missing_idempotency_key_option_is_a_usage_error(idle):
    args = [a for a in cli_args(VALID)]
    i = args.index("--idempotency-key")
    del args[i : i + 2]
    result = cli(idle, *args)
    assert result.returncode == 2
    assert "--idempotency-key" in result.stderr
    nothing_stored_or_published(idle)


def test_a_provider_without_settings_is_refused_naming_the_missing_variables(idle):
    # An empty value is as good as none (a common slip in deployment files).
    result = cli(
        idle, *cli_args(VALID), env={"REFUNDQ_VAI247_API_KEY": "", "REFUNDQ_VAI247_APP_ID": ""}
    )
    assert result.returncode == 2
    text = " ".join(result.stderr.split())
    assert "provider 'vai247' is not configured" in text
    assert "REFUNDQ_VAI247_APP_ID" in text and "REFUNDQ_VAI247_API_KEY" in text
    assert "REFUNDQ_VAI247_BASE_URL" not in text
    nothing_stored_or_published(idle)


def test_show_and_list_print_the_job(idle):
    created = cli(idle, *cli_args({**VALID, "payment_ref": unique("ord")}))
    assert created.returncode == 0, created.stderr
    job_id = created.stdout.strip()
    shown = json.loads(cli(idle, "show", job_id, "--json").stdout)
    for field in (
        "id",
        "kind",
        "provider",
        "payment_ref",
        "amount",
        "currency",
        "status",
        "provider_reference",
        "attempts",
        "last_error",
        "created_at",
        "updated_at",
    ):
        assert field in shown
    assert (
        shown["id"],
        shown["amount"],
        shown["status"],
        shown["attempts"],
        shown["last_error"],
    ) == (job_id, "50.00", "queued", 0, None)
    listed = json.loads(cli(idle, "list", "--status", "queued", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]
    table = cli(idle, "list")
    assert job_id in table.stdout and "queued" in table.stdout
    missing = cli(idle, "show", "nope")
    assert missing.returncode == 1 and "no job 'nope'" in missing.stderr
    bad_status = cli(idle, "list", "--status", "done")
    assert bad_status.returncode == 2
