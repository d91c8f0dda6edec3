"""The chaos harness: a realistic workload across the four gateways, and an audit that counts,
from the sandbox's ledger and the database (never from logs), that nothing was paid twice and
nothing was lost.

Every job refunds (or cancels) a payment of its own, so "refunded more than once per job" is
"more than one ledger entry for that payment".
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tests.support.stack import Stack
from worker.client import enqueue_cancel, enqueue_refund
from worker.db import read_session
from worker.models import Attempt, Job

FINAL_OR_UNKNOWN = ("succeeded", "declined", "failed", "unknown")
CURRENCY = {"vai247": "USD", "bbmsl": "HKD", "vaultspay": "AED", "pgv2": "INR"}
REPORT = Path("chaos-report.json")


@dataclass(frozen=True)
class Planned:
    gateway: str
    kind: str  # refund | cancel
    payment_ref: str
    payment_amount: str
    amount: str | None
    idempotency_key: str


def plan(size: int, *, seed: int, tag: str) -> list[Planned]:
    """`size` jobs spread over the four gateways: full and partial refunds, vai247 cancels."""
    rng = random.Random(seed)
    jobs: list[Planned] = []
    for i in range(size):
        gateway = ("vai247", "bbmsl", "vaultspay", "pgv2")[i % 4]
        payment = Decimal(rng.randrange(1000, 50000)) / 100
        kind = "cancel" if gateway == "vai247" and rng.random() < 0.25 else "refund"
        partial = rng.random() < 0.4
        amount = (
            None
            if kind == "cancel"
            else str((payment / 2).quantize(Decimal("0.01")) if partial else payment)
        )
        ref = f"{tag}-{gateway}-{i}"
        jobs.append(Planned(gateway, kind, ref, str(payment), amount, f"{tag}-key-{i}"))
    return jobs


def create_payments(stack: Stack, jobs: list[Planned]) -> None:
    def create(job: Planned) -> None:
        status = {"vai247": "pending" if job.kind == "cancel" else "completed"}.get(job.gateway)
        stack.sandbox.create_payment(
            job.gateway, job.payment_ref, job.payment_amount, CURRENCY[job.gateway], status=status
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, jobs))


def enqueue(jobs: list[Planned], *, threads: int = 4) -> dict[str, Planned]:
    """Enqueue every planned job (concurrently); job id -> plan."""

    def one(job: Planned) -> tuple[str, Planned]:
        if job.kind == "cancel":
            view = enqueue_cancel(
                provider=job.gateway,
                payment_ref=job.payment_ref,
                idempotency_key=job.idempotency_key,
                reason="chaos",
            )
        else:
            view = enqueue_refund(
                provider=job.gateway,
                payment_ref=job.payment_ref,
                amount=job.amount,
                currency=CURRENCY[job.gateway],
                original_amount=job.payment_amount,
                idempotency_key=job.idempotency_key,
                reason="chaos",
            )
        return view.id, job

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(pool.map(one, jobs))


def statuses() -> Counter[str]:
    with read_session() as session:
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return Counter({status: count for status, count in rows})


def settle(stack: Stack, expected: int, *, timeout: float) -> Counter[str]:
    """Wait until every job is final or unknown; fail (with the counts) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        counts = statuses()
        done = sum(counts[s] for s in FINAL_OR_UNKNOWN)
        if done >= expected:
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(
                f"lost or stuck jobs after {timeout:.0f}s: {dict(counts)} (of {expected})\n"
                + stack.logs()[-6000:]
            )
        time.sleep(0.25)


@dataclass
class Figures:
    run: str
    backend: str
    jobs: int
    seconds: float
    kills: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    final_states: dict[str, int] = field(default_factory=dict)
    unknowns: int = 0
    unknowns_money_moved: int = 0
    retries: int = 0
    double_refunds: int = 0
    lost: int = 0
    succeeded_without_ledger: int = 0
    ledger_without_job: int = 0
    reconciled: int = 0
    notes: list[str] = field(default_factory=list)


def audit(stack: Stack, planned: dict[str, Planned], figures: Figures) -> Figures:
    """Count every invariant; the caller asserts on the figures (all printed and reported)."""
    refs = {p.payment_ref: job_id for job_id, p in planned.items()}
    ledger = [e for e in stack.sandbox.ledger() if e["payment_ref"] in refs]
    per_payment = Counter(e["payment_ref"] for e in ledger)
    with read_session() as session:
        jobs = {
            j.id: j
            for j in session.execute(
                select(Job).where(Job.id.in_(list(planned)))  # type: ignore[attr-defined]
            ).scalars()
        }
        figures.retries = session.execute(
            select(func.count())
            .select_from(Attempt)
            .where(
                Attempt.job_id.in_(list(planned)),  # type: ignore[attr-defined]
                Attempt.purpose.in_(["send", "status"]),  # type: ignore[attr-defined]
            )
        ).scalar_one() - len(planned)
    figures.final_states = dict(Counter(j.status for j in jobs.values()))
    figures.double_refunds = sum(1 for count in per_payment.values() if count > 1)
    figures.lost = len(planned) - sum(1 for j in jobs.values() if j.status in FINAL_OR_UNKNOWN)
    figures.succeeded_without_ledger = sum(
        1 for j in jobs.values() if j.status == "succeeded" and per_payment[j.payment_ref] == 0
    )
    # Money moved (a ledger entry) but the job says it did not: declined, failed, or never ran.
    figures.ledger_without_job = sum(
        1
        for ref in per_payment
        if jobs[refs[ref]].status not in ("succeeded", "unknown", "awaiting_gateway")
    )
    unknown = [j for j in jobs.values() if j.status == "unknown"]
    figures.unknowns = len(unknown)
    figures.unknowns_money_moved = sum(1 for j in unknown if per_payment[j.payment_ref])
    for job in unknown:
        if not explained_by_rule_5(job):
            figures.notes.append(
                f"unexplained unknown {job.id} ({job.provider}): "
                f"{job.last_error_code} {job.last_error_message}"
            )
    return figures


def explained_by_rule_5(job: Job) -> bool:
    """An `unknown` is legitimate only after a send whose outcome could not be learned: an
    ambiguous answer (or a worker lost mid-send) at a gateway that can neither be asked about
    it nor sent it again safely — or a gateway that could be asked but never answered in time."""
    from worker import gateways, jobs

    capabilities = gateways.provider_class(job.provider).capabilities
    resolution = jobs.ambiguity_resolution(capabilities, job.provider_reference)
    if job.ambiguous_sends == 0 and job.last_error_code != "WORKER_LOST":
        return False
    if resolution is jobs.Resolution.NONE:
        return True
    # Askable gateways end unknown only when every status check failed (attempts ran out).
    return job.attempt_count >= capabilities.max_attempts


def reconcile_and_compare(planned: dict[str, Planned], stack: Stack, figures: Figures) -> None:
    """Reconcile, then check it agrees with the ledger: every job it corrected to succeeded has
    a ledger entry, every one it corrected to failed/declined has none."""
    from worker.reconcile import reconcile

    refs_with_money = {e["payment_ref"] for e in stack.sandbox.ledger()}
    report = reconcile(actor="chaos")
    figures.reconciled = len(report.corrected)
    for finding in report.corrected:
        if finding.job_id not in planned:
            continue
        moved = finding.payment_ref in refs_with_money
        if (finding.now == "succeeded") != moved:
            figures.notes.append(
                f"reconciliation disagrees with the ledger for {finding.job_id}: "
                f"{finding.now} but ledger {'has' if moved else 'has no'} entry"
            )


def assert_clean(figures: Figures) -> None:
    write_report(figures)
    print("\n" + json.dumps(asdict(figures), indent=2))
    assert figures.double_refunds == 0, figures
    assert figures.lost == 0, figures
    assert figures.succeeded_without_ledger == 0, figures
    assert figures.ledger_without_job == 0, figures
    assert not figures.notes, figures.notes


def write_report(figures: Figures) -> None:
    runs: list[dict[str, Any]] = []
    if REPORT.exists():
        try:
            runs = json.loads(REPORT.read_text()).get("runs", [])
        except ValueError:
            runs = []
    runs = [r for r in runs if (r["run"], r["backend"]) != (figures.run, figures.backend)]
    runs.append(asdict(figures))
    totals = {
        key: sum(r[key] for r in runs)
        for key in ("jobs", "kills", "unknowns", "retries", "double_refunds", "lost")
    }
    totals["faults_injected"] = sum(sum(r["faults_injected"].values()) for r in runs)
    REPORT.write_text(json.dumps({"runs": runs, "totals": totals}, indent=2) + "\n")


def faults_fired(stack: Stack) -> dict[str, int]:
    fired: Counter[str] = Counter()
    for rule in stack.sandbox.faults():
        fired[f"{rule['gateway']}:{rule['endpoint']}:{rule['kind']}"] += rule["fired"]
    return {k: v for k, v in fired.items() if v}
