"""The job state machine: every status change of every job happens here, and only here.

Each transition is one compare-and-set UPDATE (on the current status, and on the lease where a
worker holds one) plus an `events` row, in one transaction (DESIGN.md). The phases of a job
follow rocket-rides-atomic: *claim* (commit), *record the attempt as sending* (commit), call the
gateway outside any transaction, *apply the outcome* (commit). Recovery (the reaper, the
dispatcher, reconciliation) re-enters the same functions, so it is the normal path.

The hot path (enqueue, claim, record, apply) runs Core statements on a Core connection, most of
them built once at import: the ORM's unit of work and per-call statement building are Python
work a job pays on two busy cores for nothing the database needs (issue 7, BENCHMARKS.md).
The claim is an `UPDATE ... RETURNING`, so the row it needs comes back from the compare-and-set
itself.

This module reads provider *capabilities*, never provider names (STYLE.md 2).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Insert,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from providers.base import (
    Ambiguous,
    Capabilities,
    GatewayError,
    GatewayRequest,
    GatewayResult,
    Kind,
    Outcome,
    RateLimited,
)
from worker import driver, policy
from worker.clock import utcnow
from worker.db import (
    one_statement_writes,
    recheck,
    single_statements,
    write_session,
    write_transaction,
)
from worker.errors import IdempotencyConflict, InvalidRequest, OverRefund
from worker.models import LIVE_STATUSES, Attempt, Event, Job, JobStatus
from worker.money import format_amount, from_minor
from worker.views import JobView

S = JobStatus
# A write transaction: an ORM session (operator and recovery paths) or a Core connection (the
# hot path). Both take the same Core statements.
Tx = Session | Connection

JOBS: Table = Job.__table__  # type: ignore[attr-defined]
EVENTS: Table = Event.__table__  # type: ignore[attr-defined]
ATTEMPTS: Table = Attempt.__table__  # type: ignore[attr-defined]

# Which status may follow which. Nothing outside this table ever happens to `jobs.status`.
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    S.QUEUED: frozenset({S.SUBMITTING}),
    S.SUBMITTING: frozenset(
        {S.SUCCEEDED, S.DECLINED, S.FAILED, S.AWAITING_GATEWAY, S.RETRY_WAIT, S.UNKNOWN}
    ),
    S.RETRY_WAIT: frozenset({S.SUBMITTING}),
    S.AWAITING_GATEWAY: frozenset({S.SUCCEEDED, S.DECLINED, S.UNKNOWN}),
    # unknown: reconciliation or an operator decides; `queued` is an operator's forced re-drive.
    S.UNKNOWN: frozenset({S.SUCCEEDED, S.DECLINED, S.FAILED, S.AWAITING_GATEWAY, S.QUEUED}),
    # failed: nothing reached the gateway; an operator may re-drive it.
    S.FAILED: frozenset({S.QUEUED}),
    S.SUCCEEDED: frozenset(),
    S.DECLINED: frozenset(),
}
CLAIMABLE = (S.QUEUED, S.RETRY_WAIT)
# How early a claim may come before `next_attempt_at` (clock skew between hosts; a countdown
# message that arrives a hair early should not bounce to the dispatcher).
CLAIM_EARLY_TOLERANCE = timedelta(seconds=1)


class TransitionError(RuntimeError):
    """A programming error: a transition the table does not allow."""


def check_transition(from_statuses: Iterable[JobStatus], to: JobStatus) -> None:
    for source in from_statuses:
        if to not in TRANSITIONS[source]:
            raise TransitionError(f"{source} -> {to} is not a job transition")


def transition(
    session: Tx,
    job_id: str,
    *,
    from_statuses: Sequence[JobStatus],
    to: JobStatus,
    actor: str,
    lease_owner: str | None = None,
    values: Mapping[str, Any] | None = None,
    note: str | None = None,
    detail: Mapping[str, Any] | None = None,
    event_kind: str = "transition",
) -> bool:
    """Compare-and-set `job_id` from one of `from_statuses` to `to` (and, when `lease_owner` is
    given, only while that owner holds the lease), writing the event row. False if the job was
    not in such a state: somebody else moved it first, and nothing was written."""
    check_transition(from_statuses, to)
    now = utcnow()
    new_values = _moved_values(to, values, now)
    sources = tuple(s.value for s in from_statuses)
    params: dict[str, Any] = {"b_job_id": job_id}
    if lease_owner is not None:
        params["b_lease_owner"] = lease_owner
    # A statement built for this call only (values computed in SQL) runs through SQLAlchemy;
    # a cached shape may run on the driver (worker/driver.py).
    execute: Callable[[Tx, Any, Mapping[str, Any]], Any] = driver.execute
    if any(isinstance(v, ColumnElement) for v in new_values.values()):
        statement = _cas_statement(sources, lease_owner is not None, ()).values(**new_values)
        execute = _execute_built
    else:
        statement = _cas_statement(sources, lease_owner is not None, tuple(sorted(new_values)))
        params.update({f"v_{name}": value for name, value in new_values.items()})
    # The status we move from, for the event row: known when there is one candidate, else
    # read in this transaction (the CAS below still decides).
    if len(sources) == 1:
        previous: str | None = sources[0]
    else:
        found = session.execute(_status_statement(sources, lease_owner is not None), params)
        previous = found.scalar_one_or_none()
        if previous is None:
            return False
    # A Core UPDATE of the table: on an ORM session it neither reads nor refreshes loaded
    # objects (as `synchronize_session=False` did).
    result = execute(session, statement, params)
    if result.rowcount != 1:
        return False
    _insert_event(
        session,
        job_id,
        at=now,
        from_status=previous,
        to_status=to.value,
        kind=event_kind,
        actor=actor,
        note=note,
        detail=detail,
    )
    return True


def _execute_built(session: Tx, statement: Any, params: Mapping[str, Any]) -> Any:
    return session.execute(statement, params)


def _moved_values(to: JobStatus, values: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The columns a move to `to` sets: the caller's `values`, and what every such move implies
    (finished_at for a final state, no lease outside `submitting`, no poll outside awaiting)."""
    new_values: dict[str, Any] = {"status": to.value, "updated_at": now, **(values or {})}
    if to in (S.SUCCEEDED, S.DECLINED, S.FAILED, S.UNKNOWN):
        new_values.setdefault("finished_at", now)
    if to is not S.SUBMITTING:
        new_values.setdefault("lease_owner", None)
        new_values.setdefault("lease_expires_at", None)
    if to is not S.AWAITING_GATEWAY:
        new_values.setdefault("next_poll_at", None)
    return new_values


# Compare-and-set statements by shape (source statuses, lease check, columns set), built once
# each, rather than built and cache-keyed afresh on every transition (issue 7). The shapes
# are the few the state machine has, so the cache stays small.
_CAS_STATEMENTS: dict[tuple[tuple[str, ...], bool, tuple[str, ...]], Update] = {}


def _cas_conditions(sources: tuple[str, ...], with_lease: bool) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [JOBS.c.id == bindparam("b_job_id")]
    conditions.append(recheck(JOBS.c.status, *sources))
    if with_lease:
        conditions.append(JOBS.c.lease_owner == bindparam("b_lease_owner"))
    return conditions


def _cas_statement(sources: tuple[str, ...], with_lease: bool, columns: tuple[str, ...]) -> Update:
    key = (sources, with_lease, columns)
    statement = _CAS_STATEMENTS.get(key)
    if statement is None:
        statement = update(JOBS).where(*_cas_conditions(sources, with_lease))
        if columns:
            statement = statement.values(
                {name: bindparam(f"v_{name}", type_=JOBS.c[name].type) for name in columns}
            )
            _CAS_STATEMENTS[key] = statement
    return statement


def _status_statement(sources: tuple[str, ...], with_lease: bool) -> Select[Any]:
    return select(JOBS.c.status).where(*_cas_conditions(sources, with_lease))


_INSERT_EVENT = insert(EVENTS)


def _insert_event(
    session: Tx,
    job_id: str,
    *,
    at: datetime,
    kind: str,
    actor: str,
    from_status: str | None = None,
    to_status: str | None = None,
    note: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    driver.execute(
        session,
        _INSERT_EVENT,
        {
            "job_id": job_id,
            "at": at,
            "from_status": from_status,
            "to_status": to_status,
            "kind": kind,
            "actor": actor,
            "note": note,
            "detail": dict(detail) if detail else None,
        },
    )


def record_event(
    session: Tx,
    job_id: str,
    *,
    kind: str,
    actor: str,
    note: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """An event that is not a status change (a callback received, an operator's note)."""
    _insert_event(session, job_id, at=utcnow(), kind=kind, actor=actor, note=note, detail=detail)


# ---------------------------------------------------------------------------------------------
# Birth: the producer's request becomes a queued job (or the same job again, for a replay).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewJob:
    """A validated producer request (money already parsed, provider already checked)."""

    kind: Kind
    provider: str
    payment_ref: str
    currency: str | None
    amount_minor: int | None
    original_amount_minor: int | None
    reason: str | None
    extras: Mapping[str, str]
    idempotency_key: str
    notify_url: str | None = None
    single_refund_per_payment: bool = False

    def fingerprint(self) -> str:
        """What makes two requests "the same request" for the idempotency key."""
        canonical = "\x1f".join(
            [
                self.kind.value,
                self.provider,
                self.payment_ref,
                self.currency or "",
                "" if self.amount_minor is None else str(self.amount_minor),
                "" if self.original_amount_minor is None else str(self.original_amount_minor),
                self.reason or "",
                "\x1e".join(f"{k}={v}" for k, v in sorted(self.extras.items())),
                self.notify_url or "",
            ]
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_JOB_BY_KEY = select(JOBS.c.id, JOBS.c.fingerprint).where(
    JOBS.c.idempotency_key == bindparam("b_key")
)
_INSERT_JOB = insert(JOBS)


def insert_job(new: NewJob, job_id: str, *, actor: str = "producer") -> tuple[JobView, bool]:
    """Store `new` as a queued job, or return the job an earlier identical request created.

    Returns (the job's view, created). Raises `IdempotencyConflict` for the same key with a
    different request and `OverRefund` when the payment's refunds would exceed its original
    amount.
    The idempotency check is the unique constraint, so it holds under concurrent producers.

    One write transaction: the payment's lock, the key's lookup (after the lock, so a producer
    that waited for a concurrent one with the same key finds its job and replays it), the
    over-refund check, the job row and its first event.
    """
    fingerprint = new.fingerprint()
    now = utcnow()
    values: dict[str, Any] = {
        "id": job_id,
        "kind": new.kind.value,
        "provider": new.provider,
        "payment_ref": new.payment_ref,
        "amount_minor": new.amount_minor,
        "original_amount_minor": new.original_amount_minor,
        "currency": new.currency,
        "reason": new.reason,
        "extras": dict(new.extras),
        "notify_url": new.notify_url,
        "idempotency_key": new.idempotency_key,
        "fingerprint": fingerprint,
        "status": S.QUEUED.value,
        "attempt_count": 0,
        "next_attempt_at": now,
        "message_due_at": now,  # the producer publishes right after the commit
        "needs_status_check": False,
        "ambiguous_sends": 0,
        "poll_count": 0,
        "created_at": now,
        "updated_at": now,
    }
    try:
        with write_transaction() as connection:
            _lock_payment(connection, new.provider, new.payment_ref)
            existing, live_refunds = _key_and_live_refunds(connection, new)
            if existing is None:
                if new.kind is Kind.REFUND:
                    _check_refund_fits(new, live_refunds)
                _insert_new_job(connection, values, actor)
    except IntegrityError:
        # A concurrent producer committed the same key between our look and our insert.
        replayed = _job_by_key(new.idempotency_key)
        if replayed is None:
            raise
        return JobView.of(_replay(replayed, new, fingerprint)), False
    if existing is not None:
        if existing.fingerprint != fingerprint:
            raise IdempotencyConflict(new.idempotency_key, existing.id)
        replayed = _job_by_key(new.idempotency_key)
        assert replayed is not None, "jobs are never deleted"
        return JobView.of(replayed), False
    # The view of the row just written, from its values: `JobView.of` only reads attributes,
    # and an ORM `Job` would be built only to be read once (issue 7).
    return JobView.of(cast(Job, SimpleNamespace(**{**_JOB_DEFAULTS, **values}))), True


def _insert_new_job(connection: Connection, values: Mapping[str, Any], actor: str) -> None:
    """The job's row and its first event (`queued`): on PostgreSQL in one statement, one round
    trip fewer per enqueue (issue 7)."""
    if one_statement_writes():
        params = {f"n_{name}": value for name, value in values.items()}
        driver.execute(
            connection,
            _insert_job_with_event(tuple(sorted(values))),
            params | {"b_actor": actor},
        )
        return
    driver.execute(connection, _INSERT_JOB, values)
    _insert_event(
        connection,
        values["id"],
        at=values["created_at"],
        to_status=S.QUEUED.value,
        kind="transition",
        actor=actor,
    )


_INSERT_JOB_STATEMENTS: dict[tuple[str, ...], Insert] = {}


def _insert_job_with_event(columns: tuple[str, ...]) -> Insert:
    statement = _INSERT_JOB_STATEMENTS.get(columns)
    if statement is None:
        new_job = (
            insert(JOBS)
            .values({name: bindparam(f"n_{name}", type_=JOBS.c[name].type) for name in columns})
            .returning(JOBS.c.id, JOBS.c.created_at)
            .cte("new_job")
        )
        statement = insert(EVENTS).from_select(
            ["job_id", "at", "to_status", "kind", "actor"],
            select(
                new_job.c.id,
                new_job.c.created_at,
                literal(S.QUEUED.value),
                literal("transition"),
                bindparam("b_actor"),
            ),
        )
        _INSERT_JOB_STATEMENTS[columns] = statement
    return statement


# Every column's default, for the view of a new job (the factory-made `extras` is always set).
_JOB_DEFAULTS: dict[str, Any] = {
    name: None if info.is_required() or info.default_factory else info.default
    for name, info in Job.model_fields.items()
}


def _job_by_key(key: str) -> Job | None:
    from worker.db import read_session

    with read_session() as session:
        return session.execute(
            select(Job).where(col(Job.idempotency_key) == key)
        ).scalar_one_or_none()


def _replay(existing: Job, new: NewJob, fingerprint: str) -> Job:
    if existing.fingerprint != fingerprint:
        raise IdempotencyConflict(new.idempotency_key, existing.id)
    return existing


def _lock_payment(connection: Connection, provider: str, payment_ref: str) -> None:
    """Serialise enqueues for one payment, so the over-refund check sees every live job.

    SQLite: `BEGIN IMMEDIATE` already serialises writers. PostgreSQL: a transaction-scoped
    advisory lock on the payment (two producers refunding one payment wait for each other;
    producers of different payments never do).
    """
    if connection.dialect.name != "postgresql":
        return
    digest = hashlib.sha256(f"{provider}\x1f{payment_ref}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    driver.execute(connection, _ADVISORY_LOCK, {"b_key": key})


_ADVISORY_LOCK = select(func.pg_advisory_xact_lock(bindparam("b_key")))


AnyRow = Row[*tuple[Any, ...]]
_LIVE_STATUS_VALUES = frozenset(s.value for s in LIVE_STATUSES)
# A refund's two reads in one statement (one round trip fewer on PostgreSQL, issue 7): the job
# its idempotency key already names, if any, and the payment's live refunds, which the
# over-refund check adds up. Both sides of the OR have their index (the key's unique index,
# ix_jobs_payment).
_KEY_OR_LIVE_REFUNDS = select(
    JOBS.c.id,
    JOBS.c.fingerprint,
    JOBS.c.idempotency_key,
    JOBS.c.kind,
    JOBS.c.status,
    JOBS.c.amount_minor,
    JOBS.c.original_amount_minor,
    JOBS.c.currency,
).where(
    or_(
        JOBS.c.idempotency_key == bindparam("b_key"),
        and_(
            JOBS.c.provider == bindparam("b_provider"),
            JOBS.c.payment_ref == bindparam("b_payment_ref"),
            JOBS.c.kind == Kind.REFUND.value,
            # Equalities rather than `in_`: an IN list is expanded per execution, which only
            # SQLAlchemy's execution context does (worker/driver.py).
            or_(*(JOBS.c.status == status for status in sorted(_LIVE_STATUS_VALUES))),
        ),
    )
)


def _key_and_live_refunds(
    connection: Connection, new: NewJob
) -> tuple[AnyRow | None, Sequence[AnyRow]]:
    """The job `new`'s idempotency key names (None if none), and the live refunds of its
    payment (read for refunds only: a cancel has no amount to check)."""
    if new.kind is not Kind.REFUND:
        return driver.execute(connection, _JOB_BY_KEY, {"b_key": new.idempotency_key}).first(), []
    rows = driver.execute(
        connection,
        _KEY_OR_LIVE_REFUNDS,
        {
            "b_key": new.idempotency_key,
            "b_provider": new.provider,
            "b_payment_ref": new.payment_ref,
        },
    ).all()
    existing = next((row for row in rows if row.idempotency_key == new.idempotency_key), None)
    # With no job under the key, every row came from the OR's second side; with one, the
    # request is a replay and the live refunds do not matter.
    return existing, rows if existing is None else []


def _check_refund_fits(new: NewJob, rows: Sequence[AnyRow]) -> None:
    if new.single_refund_per_payment and rows:
        raise OverRefund(
            "payment_ref",
            f"{new.provider} refunds a payment only once, and job {rows[0].id} already refunds "
            f"{new.payment_ref}; wait for it to be declined or failed before refunding again",
        )
    for row in rows:
        if row.currency != new.currency:
            raise InvalidRequest(
                "currency",
                f"payment {new.payment_ref} was refunded in {row.currency} (job {row.id}), "
                f"not {new.currency}",
            )
    known = [r.original_amount_minor for r in rows if r.original_amount_minor is not None]
    original = (
        new.original_amount_minor
        if new.original_amount_minor is not None
        else (max(known) if known else None)
    )
    if original is None or new.amount_minor is None or new.currency is None:
        return
    committed = sum(r.amount_minor or 0 for r in rows)
    if committed + new.amount_minor > original:
        raise OverRefund(
            "amount",
            f"refunding {format_amount(new.amount_minor, new.currency)} {new.currency} of "
            f"{new.payment_ref} would bring its refunds to "
            f"{format_amount(committed + new.amount_minor, new.currency)}, above the original "
            f"{format_amount(original, new.currency)} (already refunded or in flight: "
            f"{format_amount(committed, new.currency)} in {len(rows)} job(s))",
        )


# ---------------------------------------------------------------------------------------------
# Claim, record, apply: one worker's turn with a job.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A job a worker holds a lease on, as the worker needs it (a detached snapshot)."""

    job_id: str
    lease_owner: str
    kind: Kind
    provider: str
    payment_ref: str
    currency: str | None
    amount_minor: int | None
    original_amount_minor: int | None
    reason: str | None
    extras: Mapping[str, str]
    provider_reference: str | None
    attempt_count: int
    needs_status_check: bool
    ambiguous_sends: int
    previous_status: str
    created_at: datetime | None = None
    # Write-once at enqueue: a worker that knows it is None skips the notification lookup.
    notify_url: str | None = None

    def gateway_request(self, callback_url: str | None = None) -> GatewayRequest:
        amount = original = None
        if self.currency is not None:
            if self.amount_minor is not None:
                amount = from_minor(self.amount_minor, self.currency)
            if self.original_amount_minor is not None:
                original = from_minor(self.original_amount_minor, self.currency)
        return GatewayRequest(
            job_id=self.job_id,
            kind=self.kind,
            payment_ref=self.payment_ref,
            currency=self.currency or "",
            amount=amount,
            original_amount=original,
            reason=self.reason,
            extras=dict(self.extras),
            provider_reference=self.provider_reference,
            callback_url=callback_url,
        )


# The claim's compare-and-set, returning what the worker needs: one statement per candidate
# status (the event row records which one the job left, and RETURNING only sees new values).
_CLAIM_RETURNING = (
    JOBS.c.id,
    JOBS.c.kind,
    JOBS.c.provider,
    JOBS.c.payment_ref,
    JOBS.c.currency,
    JOBS.c.amount_minor,
    JOBS.c.original_amount_minor,
    JOBS.c.reason,
    JOBS.c.extras,
    JOBS.c.provider_reference,
    JOBS.c.attempt_count,
    JOBS.c.needs_status_check,
    JOBS.c.ambiguous_sends,
    JOBS.c.created_at,
    JOBS.c.notify_url,
)
_DUE = or_(
    JOBS.c.next_attempt_at.is_(None),
    JOBS.c.next_attempt_at <= bindparam("b_due_by", type_=JOBS.c.next_attempt_at.type),
)
_CLAIM_SETS: dict[str, Any] = {
    "status": S.SUBMITTING.value,
    "updated_at": bindparam("b_now", type_=JOBS.c.updated_at.type),
    "next_poll_at": None,
    "lease_owner": bindparam("b_owner", type_=JOBS.c.lease_owner.type),
    "lease_expires_at": bindparam("b_lease_until", type_=JOBS.c.lease_expires_at.type),
    "attempt_count": JOBS.c.attempt_count + 1,
}
_CLAIM = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_job_id"), recheck(JOBS.c.status, bindparam("b_from")), _DUE)
    .values(**_CLAIM_SETS)
    .returning(*_CLAIM_RETURNING)
)
check_transition(CLAIMABLE, S.SUBMITTING)


# The first call of a turn, as `claim_job` asks the worker for it: (purpose, request summary),
# or None when something may stand between the claim and that call.
FirstCall = Callable[[Claim], tuple[str, Mapping[str, Any]] | None]


def claim_job(
    job_id: str,
    lease_owner: str,
    lease_seconds: float,
    first_call: FirstCall | None = None,
) -> tuple[Claim, int | None] | None:
    """Rule 2, claim before work: queued|retry_wait -> submitting with a lease, in one CAS.
    None when there is nothing to claim (done already, held by another worker, not yet due):
    a duplicate or late message simply ends there.

    `first_call(claim)` may name the call the worker makes next, when nothing can come between
    the claim and that call (no rate-limit wait, the provider ready): its attempt row is then
    written in the claim's transaction (rule 3 holds, it commits before the call) and its id
    returned with the claim, so a job costs one transaction fewer (issue 7, BENCHMARKS.md). The
    price: a worker killed in the instant between this commit and the call leaves a `sending`
    attempt, which rule 5 must treat as possibly sent, where a separate claim would have left
    a clean one. Otherwise (None, or no `first_call`) the attempt id is None and the worker
    records its attempt itself (`record_attempt`)."""
    if one_statement_writes():
        return _claim_in_one_statement(job_id, lease_owner, lease_seconds, first_call)
    now = utcnow()
    params = {
        "b_job_id": job_id,
        "b_due_by": now + CLAIM_EARLY_TOLERANCE,
        "b_now": now,
        "b_owner": lease_owner,
        "b_lease_until": now + timedelta(seconds=lease_seconds),
    }
    with write_transaction() as connection:
        for previous in CLAIMABLE:
            row = driver.execute(connection, _CLAIM, {**params, "b_from": previous.value}).first()
            if row is not None:
                break
        else:
            return None
        _insert_event(
            connection,
            job_id,
            at=now,
            from_status=previous.value,
            to_status=S.SUBMITTING.value,
            kind="transition",
            actor=lease_owner,
        )
        claim = claim_of(row, lease_owner, previous_status=previous.value)
        call = first_call(claim) if first_call is not None else None
        attempt_id = None if call is None else _insert_attempt(connection, claim, *call)
    return claim, attempt_id


# PostgreSQL: the claim as one read and one statement, two round trips where the transaction
# above takes five (BEGIN, UPDATE, two INSERTs, COMMIT; issue 7, BENCHMARKS.md). The read
# takes the job as it stands; the statement's compare-and-set holds only if nothing has
# changed it since (its status, attempt count and `updated_at`, which every write of a job's
# state sets), and inserts the event and the attempt from the row it moved: all three commit
# together, or nothing is written and the claim is someone else's.
_CLAIM_SNAPSHOT = select(
    *_CLAIM_RETURNING, JOBS.c.status, JOBS.c.updated_at, JOBS.c.next_attempt_at
).where(JOBS.c.id == bindparam("b_job_id"))
_CLAIMABLE_VALUES = frozenset(s.value for s in CLAIMABLE)


def _claim_statement(with_attempt: bool) -> Select[Any] | Insert:
    """The claim's compare-and-set with its event row, and with the first attempt's row when
    `with_attempt`; returns one row (the attempt's id, or the job's) if the job was claimed."""
    claimed = (
        update(JOBS)
        .where(
            JOBS.c.id == bindparam("b_job_id"),
            recheck(JOBS.c.status, bindparam("b_from")),
            JOBS.c.attempt_count == bindparam("b_seen_attempts"),
            JOBS.c.updated_at == bindparam("b_seen_at", type_=JOBS.c.updated_at.type),
            _DUE,
        )
        .values(**_CLAIM_SETS)
        .returning(JOBS.c.id)
        .cte("claimed")
    )
    event = (
        insert(EVENTS)
        .from_select(
            ["job_id", "at", "from_status", "to_status", "kind", "actor"],
            select(
                claimed.c.id,
                bindparam("b_now", type_=EVENTS.c.at.type),
                bindparam("b_from"),
                literal(S.SUBMITTING.value),
                literal("transition"),
                bindparam("b_owner"),
            ),
        )
        .cte("claim_event")
    )
    if not with_attempt:
        return select(claimed.c.id).add_cte(event)
    return (
        insert(ATTEMPTS)
        .from_select(
            [
                "job_id",
                "number",
                "purpose",
                "state",
                "lease_owner",
                "started_at",
                "request_summary",
            ],
            select(
                claimed.c.id,
                bindparam("b_number", type_=ATTEMPTS.c.number.type),
                bindparam("b_purpose", type_=ATTEMPTS.c.purpose.type),
                literal("sending"),
                bindparam("b_owner"),
                bindparam("b_now"),
                bindparam("b_summary", type_=ATTEMPTS.c.request_summary.type),
            ),
        )
        .returning(ATTEMPTS.c.id)
        .add_cte(event)
    )


_CLAIM_WITH_ATTEMPT = _claim_statement(with_attempt=True)
_CLAIM_WITHOUT_ATTEMPT = _claim_statement(with_attempt=False)


def _claim_in_one_statement(
    job_id: str, lease_owner: str, lease_seconds: float, first_call: FirstCall | None
) -> tuple[Claim, int | None] | None:
    now = utcnow()
    with single_statements() as connection:
        seen = driver.execute(connection, _CLAIM_SNAPSHOT, {"b_job_id": job_id}).first()
        if seen is None or seen.status not in _CLAIMABLE_VALUES:
            return None
        if seen.next_attempt_at is not None and seen.next_attempt_at > now + CLAIM_EARLY_TOLERANCE:
            return None
        claim = dataclasses.replace(
            claim_of(seen, lease_owner), attempt_count=seen.attempt_count + 1
        )
        call = first_call(claim) if first_call is not None else None
        params: dict[str, Any] = {
            "b_job_id": job_id,
            "b_from": seen.status,
            "b_seen_attempts": seen.attempt_count,
            "b_seen_at": seen.updated_at,
            "b_due_by": now + CLAIM_EARLY_TOLERANCE,
            "b_now": now,
            "b_owner": lease_owner,
            "b_lease_until": now + timedelta(seconds=lease_seconds),
        }
        if call is None:
            row = driver.execute(connection, _CLAIM_WITHOUT_ATTEMPT, params).first()
            return None if row is None else (claim, None)
        purpose, summary = call
        params.update(b_number=claim.attempt_count, b_purpose=purpose, b_summary=dict(summary))
        row = driver.execute(connection, _CLAIM_WITH_ATTEMPT, params).first()
        return None if row is None else (claim, int(row[0]))


_INSERT_ATTEMPT = insert(ATTEMPTS)


def record_attempt(claim: Claim, purpose: str, request_summary: Mapping[str, Any]) -> int:
    """Rule 3, record before send: the attempt row commits as `sending` before the call, so a
    worker that dies mid-call leaves evidence that the request may have left."""
    with write_transaction() as connection:
        return _insert_attempt(connection, claim, purpose, request_summary)


def _insert_attempt(
    connection: Connection, claim: Claim, purpose: str, request_summary: Mapping[str, Any]
) -> int:
    result = driver.execute(
        connection,
        _INSERT_ATTEMPT,
        {
            "job_id": claim.job_id,
            "number": claim.attempt_count,
            "purpose": purpose,
            "state": "sending",
            "lease_owner": claim.lease_owner,
            "started_at": utcnow(),
            "request_summary": dict(request_summary),
        },
    )
    attempt_id = result.inserted_primary_key[0]
    assert attempt_id is not None
    return int(attempt_id)


class Next(enum.StrEnum):
    """What the caller (a task) must do after a job's turn."""

    DONE = "done"  # a final state, or a state someone else drives (poll, operator)
    RETRY = "retry"  # publish execute_job again after `delay_seconds`
    LOST = "lost"  # the lease was gone when the outcome came back (see `apply`)


@dataclass(frozen=True)
class Turn:
    """The result of applying one call's outcome."""

    status: JobStatus | None
    next: Next
    delay_seconds: float | None = None
    notify: bool = False  # the job reached a state a shop is told about (final or unknown)


@dataclass(frozen=True)
class Decision:
    """What an outcome means for the job: where it goes and what else changes."""

    to: JobStatus
    values: dict[str, Any] = field(default_factory=dict)
    retry_delay: float | None = None
    note: str | None = None


def decide_result(
    claim: Claim,
    capabilities: Capabilities,
    result: GatewayResult,
    poll_delays: Sequence[float],
    poll_deadline_seconds: float,
) -> Decision:
    """The gateway answered: map its outcome to our next state."""
    values: dict[str, Any] = {
        "raw_status": result.raw_status,
        "needs_status_check": False,
    }
    if result.provider_reference:
        values["provider_reference"] = result.provider_reference
    outcome = result.outcome
    if outcome is Outcome.SUCCEEDED:
        values.update(last_error_code=None, last_error_message=None, last_error_retryable=None)
        return Decision(S.SUCCEEDED, values)
    if outcome in (Outcome.DECLINED, Outcome.FAILED):
        values.update(
            last_error_code=result.code,
            last_error_message=result.message,
            last_error_retryable=False,
        )
        return Decision(S.DECLINED if outcome is Outcome.DECLINED else S.FAILED, values)
    if outcome is Outcome.PENDING:
        now = utcnow()
        values.update(
            next_poll_at=now + timedelta(seconds=poll_delays[0]),
            poll_deadline_at=now + timedelta(seconds=poll_deadline_seconds),
            poll_count=0,
        )
        return Decision(S.AWAITING_GATEWAY, values)
    if outcome is Outcome.UNRESOLVED:
        values.update(
            last_error_code=result.code or "UNRESOLVED",
            last_error_message=result.message,
            last_error_retryable=False,
        )
        return Decision(S.UNKNOWN, values, note="the gateway's answer does not match this job")
    # NOT_FOUND is an answer to a status query only; `engine` handles it before we get here.
    raise TransitionError(f"outcome {outcome} cannot end a send")


def decide_error(
    claim: Claim,
    capabilities: Capabilities,
    error: GatewayError,
    purpose: str,
    retry: policy.RetryPolicy,
) -> Decision:
    """We could not get a trustworthy answer: retry what is safe, resolve what is ambiguous
    by rule 5, give up safely when attempts run out."""
    values: dict[str, Any] = {
        "last_error_code": error.code or type(error).__name__,
        "last_error_message": error.message,
    }
    ambiguous_send = isinstance(error, Ambiguous) and purpose == "send"
    ambiguous_sends = claim.ambiguous_sends + (1 if ambiguous_send else 0)
    if ambiguous_send:
        values["ambiguous_sends"] = ambiguous_sends
    needs_check = claim.needs_status_check or ambiguous_send
    if ambiguous_send:
        resolution = ambiguity_resolution(capabilities, claim.provider_reference)
        if resolution is Resolution.ASK:
            values["needs_status_check"] = True
        elif resolution is Resolution.NONE:
            values["last_error_retryable"] = False
            return Decision(
                S.UNKNOWN,
                values,
                note="ambiguous send to a gateway that can neither be asked nor safely resent "
                "(rule 5); reconcile or resolve by hand",
            )
        else:  # RESEND: the same reference again cannot refund twice.
            needs_check = False
            values["needs_status_check"] = False
    exhausted = claim.attempt_count >= capabilities.max_attempts
    if exhausted and not ambiguous_send and _within_patience(claim, error, retry):
        # Never reached the gateway, and still within the patience window: an outage is
        # waited out rather than turned into a failed refund (nothing is lost by waiting).
        exhausted = False
    if exhausted:
        values["last_error_retryable"] = False
        if ambiguous_sends > 0 or needs_check:
            return Decision(
                S.UNKNOWN,
                values,
                note=f"gave up after {claim.attempt_count} attempts with the outcome of an "
                "earlier send still unknown",
            )
        return Decision(
            S.FAILED,
            values,
            note=f"gave up after {claim.attempt_count} attempts; the gateway never received it",
        )
    retry_after = error.retry_after if isinstance(error, RateLimited) else None
    delay = retry.delay(claim.attempt_count, retry_after=retry_after)
    due = utcnow() + timedelta(seconds=delay)
    # The caller publishes a countdown message for `due` (or, for waits longer than Celery
    # should hold, leaves it to the dispatcher, which then runs it `redispatch_after` late).
    values.update(last_error_retryable=True, next_attempt_at=due, message_due_at=due)
    return Decision(S.RETRY_WAIT, values, retry_delay=delay)


def _within_patience(claim: Claim, error: GatewayError, retry: policy.RetryPolicy) -> bool:
    """A not-sent error (connect refused, 503, 429) — of a send, or of the status check that
    must settle an earlier ambiguous send — on a job still younger than the policy's patience.
    Both are safe to repeat: nothing reached the gateway this time."""
    from providers.base import NotSent

    if not isinstance(error, NotSent) or claim.created_at is None:
        return False
    age = (utcnow() - claim.created_at).total_seconds()
    return age < retry.patience_seconds


class Resolution(enum.StrEnum):
    ASK = "ask"  # query the gateway before anything else
    RESEND = "resend"  # send again with the same reference
    NONE = "none"  # neither: unknown


def ambiguity_resolution(capabilities: Capabilities, provider_reference: str | None) -> Resolution:
    """DESIGN.md rule 5, from capabilities alone."""
    if capabilities.status_query and (
        capabilities.status_by_own_reference or provider_reference is not None
    ):
        return Resolution.ASK
    if capabilities.resend_safe:
        return Resolution.RESEND
    return Resolution.NONE


_FINISH_ATTEMPT = (
    update(ATTEMPTS)
    .where(ATTEMPTS.c.id == bindparam("b_attempt_id"))
    .values(
        state="done",
        **{
            name: bindparam(f"b_{name}", type_=ATTEMPTS.c[name].type)
            for name in (
                "finished_at",
                "duration_ms",
                "http_status",
                "outcome_class",
                "code",
                "message",
                "retry_delay_seconds",
            )
        },
    )
)


def apply(
    claim: Claim,
    attempt_id: int,
    decision: Decision,
    *,
    attempt_outcome: str,
    http_status: int | None,
    code: str | None,
    message: str | None,
    duration_ms: float,
) -> Turn:
    """Commit the attempt's outcome and the job's new state together."""
    now = utcnow()
    finish = {
        "b_attempt_id": attempt_id,
        "b_finished_at": now,
        "b_duration_ms": duration_ms,
        "b_http_status": http_status,
        "b_outcome_class": attempt_outcome,
        "b_code": code,
        "b_message": message,
        "b_retry_delay_seconds": decision.retry_delay,
    }
    plain = not any(isinstance(v, ColumnElement) for v in decision.values.values())
    if plain and one_statement_writes():
        moved = _apply_in_one_statement(claim, decision, finish, now)
    else:
        with write_transaction() as connection:
            driver.execute(connection, _FINISH_ATTEMPT, finish)
            moved = transition(
                connection,
                claim.job_id,
                from_statuses=[S.SUBMITTING],
                to=decision.to,
                actor=claim.lease_owner,
                lease_owner=claim.lease_owner,
                values=decision.values,
                note=decision.note,
            )
    if not moved:
        # Cannot happen while the task's time limit is below the lease; if it does, the reaper
        # already applied rule 5 and the attempt row keeps what the gateway said.
        return Turn(None, Next.LOST)
    if decision.to is S.RETRY_WAIT:
        return Turn(decision.to, Next.RETRY, decision.retry_delay)
    return Turn(decision.to, Next.DONE, notify=decision.to in NOTIFY_STATUSES)


# PostgreSQL: the outcome as one statement, one round trip where the transaction above takes
# five (issue 7): the attempt's row is finished whatever happens to the job (as above, where
# it commits even if the compare-and-set finds the job moved), and the event row is inserted
# from the job row the compare-and-set moved, so there is one exactly when the job moved.
# Built once per shape: the columns the decision sets.
_APPLY_STATEMENTS: dict[tuple[str, ...], Insert] = {}


def _apply_statement(columns: tuple[str, ...]) -> Insert:
    statement = _APPLY_STATEMENTS.get(columns)
    if statement is None:
        moved = (
            _cas_statement((S.SUBMITTING.value,), True, columns).returning(JOBS.c.id).cte("moved")
        )
        statement = (
            insert(EVENTS)
            .from_select(
                ["job_id", "at", "from_status", "to_status", "kind", "actor", "note"],
                select(
                    moved.c.id,
                    bindparam("v_updated_at", type_=EVENTS.c.at.type),
                    literal(S.SUBMITTING.value),
                    bindparam("v_status"),
                    literal("transition"),
                    bindparam("b_lease_owner"),
                    bindparam("b_note", type_=EVENTS.c.note.type),
                ),
            )
            .returning(EVENTS.c.id)
            .add_cte(_FINISH_ATTEMPT.cte("finished"))
        )
        _APPLY_STATEMENTS[columns] = statement
    return statement


def _apply_in_one_statement(
    claim: Claim, decision: Decision, finish: Mapping[str, Any], now: datetime
) -> bool:
    check_transition([S.SUBMITTING], decision.to)
    values = _moved_values(decision.to, decision.values, now)
    params: dict[str, Any] = {
        **finish,
        "b_job_id": claim.job_id,
        "b_lease_owner": claim.lease_owner,
        "b_note": decision.note,
        **{f"v_{name}": value for name, value in values.items()},
    }
    with single_statements() as connection:
        return (
            driver.execute(connection, _apply_statement(tuple(sorted(values))), params).first()
            is not None
        )


def release_claim(claim: Claim, delay_seconds: float, *, note: str) -> Turn:
    """Hand a claimed job back without calling the gateway and without spending an attempt
    (its gateway's rate limit has no slot soon): retry_wait, due after `delay_seconds`."""
    due = utcnow() + timedelta(seconds=delay_seconds)
    with write_transaction() as connection:
        moved = transition(
            connection,
            claim.job_id,
            from_statuses=[S.SUBMITTING],
            to=S.RETRY_WAIT,
            actor=claim.lease_owner,
            lease_owner=claim.lease_owner,
            values={
                "attempt_count": claim.attempt_count - 1,
                "next_attempt_at": due,
                "message_due_at": due,
            },
            note=note,
        )
    if not moved:
        return Turn(None, Next.LOST)
    return Turn(S.RETRY_WAIT, Next.RETRY, delay_seconds)


def finish_status_check_not_found(claim: Claim, attempt_id: int, duration_ms: float) -> None:
    """The gateway says it never received our refund: the job may be sent again in this very
    turn (the lease is still ours). Recorded on the attempt; the status stays `submitting`."""
    with write_session() as session:
        session.execute(
            update(Attempt)
            .where(col(Attempt.id) == attempt_id)
            .values(
                state="done",
                finished_at=utcnow(),
                duration_ms=duration_ms,
                outcome_class=Outcome.NOT_FOUND.value,
            )
        )
        session.execute(
            update(Job)
            .where(col(Job.id) == claim.job_id, col(Job.lease_owner) == claim.lease_owner)
            .values(needs_status_check=False, updated_at=utcnow())
        )
        record_event(
            session,
            claim.job_id,
            kind="note",
            actor=claim.lease_owner,
            note="status check: the gateway never received the earlier send; sending again",
        )


NOTIFY_STATUSES = frozenset({S.SUCCEEDED, S.DECLINED, S.FAILED, S.UNKNOWN})


# ---------------------------------------------------------------------------------------------
# Recovery: expired leases (the reaper) and lost messages (the dispatcher).
# ---------------------------------------------------------------------------------------------


def expired_leases(now: datetime, limit: int) -> list[str]:
    from worker.db import read_session

    with read_session() as session:
        return list(
            session.execute(
                select(col(Job.id))
                .where(col(Job.status) == S.SUBMITTING.value, col(Job.lease_expires_at) < now)
                .order_by(col(Job.lease_expires_at))
                .limit(limit)
            ).scalars()
        )


def reap(
    job_id: str,
    reaper: str,
    capabilities_for: Callable[[str], Capabilities],
    retry: policy.RetryPolicy,
) -> Turn:
    """A `submitting` job whose lease expired: its worker died or hung. What it left decides:
    no `sending` attempt -> it never called the gateway: retry now. A `sending` send -> the
    call may have been applied: rule 5, exactly as for an ambiguous answer. A `sending` status
    check -> harmless: check again."""
    now = utcnow()
    with write_session() as session:
        job = session.execute(
            select(Job).where(
                col(Job.id) == job_id,
                recheck(col(Job.status), S.SUBMITTING.value),
                col(Job.lease_expires_at) < now,
            )
        ).scalar_one_or_none()
        if job is None:
            return Turn(None, Next.DONE)
        dead_owner = job.lease_owner
        capabilities = capabilities_for(job.provider)
        sending = (
            session.execute(
                select(Attempt).where(
                    col(Attempt.job_id) == job_id, col(Attempt.state) == "sending"
                )
            )
            .scalars()
            .all()
        )
        for attempt in sending:
            attempt.state = "abandoned"
            attempt.finished_at = now
            attempt.outcome_class = "worker_lost"
            attempt.message = f"lease of {attempt.lease_owner} expired during the call"
        claim = claim_of(job, dead_owner or "")
        sent = any(a.purpose == "send" for a in sending)
        if sent:
            error: GatewayError = Ambiguous(
                f"worker {dead_owner} was lost while sending (lease expired)", code="WORKER_LOST"
            )
            decision = decide_error(claim, capabilities, error, "send", retry)
        else:
            what = "checking status" if sending else "before calling the gateway"
            error = _WorkerLostBeforeSend(
                f"worker {dead_owner} was lost {what}", code="WORKER_LOST"
            )
            decision = decide_error(
                claim, capabilities, error, "status" if sending else "claim", retry.immediate()
            )
        moved = transition(
            session,
            job_id,
            from_statuses=[S.SUBMITTING],
            to=decision.to,
            actor=reaper,
            lease_owner=dead_owner,
            values=decision.values,
            note=decision.note or error.message,
        )
    if not moved:
        return Turn(None, Next.DONE)
    if decision.to is S.RETRY_WAIT:
        return Turn(decision.to, Next.RETRY, decision.retry_delay)
    return Turn(decision.to, Next.DONE, notify=decision.to in NOTIFY_STATUSES)


class _WorkerLostBeforeSend(GatewayError):
    outcome_class = "worker_lost"


# Why no `SELECT ... FOR UPDATE SKIP LOCKED` (DESIGN.md allows it "where it helps"): every claim
# here is a single conditional UPDATE that succeeds for exactly one contender, on SQLite and
# PostgreSQL alike, and the sweeps read a bounded batch of ids first. Concurrent dispatchers or
# pollers therefore never block on each other's rows; they lose the compare-and-set and move
# on. SKIP LOCKED would only save those lost updates — not worth a second, PostgreSQL-only path.


def due_for_dispatch(now: datetime, stale: datetime, limit: int) -> list[str]:
    """Jobs whose time has come and whose last message, if any, was due at `stale` or before.

    `message_due_at` is when the last message published for the job was due to run; a job
    still claimable well past that has lost its message (Redis flushed, restarted, or a
    countdown longer than we hand to Celery).
    """
    from worker.db import read_session

    with read_session() as session:
        return list(
            session.execute(
                select(col(Job.id))
                .where(
                    col(Job.status).in_([s.value for s in CLAIMABLE]),
                    col(Job.next_attempt_at) <= now,
                    or_(col(Job.message_due_at).is_(None), col(Job.message_due_at) <= stale),
                )
                .order_by(col(Job.next_attempt_at))
                .limit(limit)
            ).scalars()
        )


def mark_published(
    job_ids: Sequence[str], due_at: datetime, *, only_if_stale_before: datetime | None = None
) -> list[str]:
    """Note that a message was published for these jobs, due at `due_at`. With
    `only_if_stale_before`, a compare-and-set: only jobs nobody re-published meanwhile are
    returned (two dispatchers never both publish the same job for the same due time)."""
    if not job_ids:
        return []
    with write_session() as session:
        conditions: list[ColumnElement[bool]] = [col(Job.id).in_(list(job_ids))]
        if only_if_stale_before is not None:
            conditions.append(
                or_(
                    col(Job.message_due_at).is_(None),
                    col(Job.message_due_at) <= only_if_stale_before,
                )
            )
            conditions.append(col(Job.status).in_([s.value for s in CLAIMABLE]))
        rows = (
            session.execute(
                update(Job)
                .where(and_(*conditions))
                .values(message_due_at=due_at)
                .returning(col(Job.id))
            )
            .scalars()
            .all()
        )
        return list(rows)


def amount_text(minor: int | None, currency: str | None) -> str | None:
    return format_amount(minor, currency)


def decimal_amount(minor: int | None, currency: str | None) -> Decimal | None:
    if minor is None or currency is None:
        return None
    return from_minor(minor, currency)


# ---------------------------------------------------------------------------------------------
# Settlement polling (gateways that settle later: `Capabilities.settles_async`).
# ---------------------------------------------------------------------------------------------


def due_polls(now: datetime, limit: int) -> list[str]:
    """Awaiting jobs whose poll time has come, oldest first. Served by the partial index on
    `next_poll_at` (only awaiting jobs carry one): the cost follows what is due, not what waits.
    """
    from worker.db import read_session

    with read_session() as session:
        return list(
            session.execute(
                select(col(Job.id))
                .where(col(Job.next_poll_at).is_not(None), col(Job.next_poll_at) <= now)
                .order_by(col(Job.next_poll_at))
                .limit(limit)
            ).scalars()
        )


class PollClaim(enum.StrEnum):
    POLL = "poll"  # claimed for this due time: ask the gateway
    EXPIRED = "expired"  # past its deadline: moved to unknown
    TAKEN = "taken"  # someone else claimed it, or it is no longer awaiting


def claim_poll(
    job_id: str, schedule: Sequence[float], *, actor: str, force: bool = False
) -> PollClaim:
    """Claim one poll of an awaiting job: a compare-and-set that moves `next_poll_at` to the
    next slot of the schedule. Two beats (or a tick overlapping the last) never poll a job twice
    for one due time. `force` claims even if not yet due (a callback asks for a check now)."""
    now = utcnow()
    with write_session() as session:
        row = session.execute(
            select(col(Job.next_poll_at), col(Job.poll_count), col(Job.poll_deadline_at)).where(
                col(Job.id) == job_id, recheck(col(Job.status), S.AWAITING_GATEWAY.value)
            )
        ).one_or_none()
        if row is None or row.next_poll_at is None:
            return PollClaim.TAKEN
        if not force and row.next_poll_at > now:
            return PollClaim.TAKEN
        if row.poll_deadline_at is not None and row.poll_deadline_at <= now:
            moved = transition(
                session,
                job_id,
                from_statuses=[S.AWAITING_GATEWAY],
                to=S.UNKNOWN,
                actor=actor,
                values={
                    "last_error_code": "NOT_SETTLED_IN_TIME",
                    "last_error_message": "gateway did not settle in time",
                    "last_error_retryable": False,
                },
                note=f"gateway did not settle in time ({row.poll_count} polls)",
            )
            return PollClaim.EXPIRED if moved else PollClaim.TAKEN
        delay = policy.poll_delay(schedule, row.poll_count + 1)
        claimed = session.execute(
            update(Job)
            .where(
                col(Job.id) == job_id,
                recheck(col(Job.status), S.AWAITING_GATEWAY.value),
                recheck(col(Job.next_poll_at), row.next_poll_at),
            )
            .values(
                next_poll_at=now + timedelta(seconds=delay),
                poll_count=col(Job.poll_count) + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return PollClaim.POLL if claimed.rowcount == 1 else PollClaim.TAKEN  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PollTarget:
    """What a poll needs to ask the gateway."""

    claim: Claim
    poll_count: int


def poll_target(job_id: str, actor: str) -> PollTarget | None:
    """The awaiting job, as a gateway request needs it; None if it is no longer awaiting."""
    from worker.db import read_session

    with read_session() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != S.AWAITING_GATEWAY.value:
            return None
        return PollTarget(claim=claim_of(job, actor), poll_count=job.poll_count)


def claim_of(job: Job | AnyRow, actor: str, *, previous_status: str | None = None) -> Claim:
    """A detached snapshot of `job` (a loaded job, or the row a claim's UPDATE returned) as a
    gateway call needs it; `previous_status`: the status it had, when `job` is newer."""
    return Claim(
        job_id=job.id,
        lease_owner=actor,
        kind=Kind(job.kind),
        provider=job.provider,
        payment_ref=job.payment_ref,
        currency=job.currency,
        amount_minor=job.amount_minor,
        original_amount_minor=job.original_amount_minor,
        reason=job.reason,
        extras=dict(job.extras or {}),
        provider_reference=job.provider_reference,
        attempt_count=job.attempt_count,
        needs_status_check=job.needs_status_check,
        ambiguous_sends=job.ambiguous_sends,
        previous_status=previous_status or job.status,
        created_at=job.created_at,
        notify_url=job.notify_url,
    )


def record_poll(claim: Claim, poll_count: int, purpose: str = "poll") -> int:
    """A status check's attempt row (`poll`, `reconcile`), committed before the call like any
    other gateway call."""
    with write_session() as session:
        attempt = Attempt(
            job_id=claim.job_id,
            number=poll_count,
            purpose=purpose,
            state="sending",
            lease_owner=claim.lease_owner,
            started_at=utcnow(),
            request_summary={"purpose": purpose, "provider_reference": claim.provider_reference},
        )
        session.add(attempt)
        session.flush()
        assert attempt.id is not None
        return attempt.id


def finish_check(
    session: Session,
    attempt_id: int,
    *,
    result: GatewayResult | None,
    error: GatewayError | None,
    duration_ms: float,
) -> None:
    """Complete a status check's attempt row with what came back."""
    answer: GatewayResult | GatewayError | None = result if result is not None else error
    session.execute(
        update(Attempt)
        .where(col(Attempt.id) == attempt_id)
        .values(
            state="done",
            finished_at=utcnow(),
            duration_ms=duration_ms,
            http_status=answer.http_status if answer is not None else None,
            outcome_class=(
                result.outcome.value if result else error.outcome_class if error else None
            ),
            code=answer.code if answer is not None else None,
            message=answer.message if answer is not None else None,
        )
    )


def apply_poll(
    claim: Claim,
    attempt_id: int,
    *,
    result: GatewayResult | None,
    error: GatewayError | None,
    duration_ms: float,
    retry_after_floor: datetime | None = None,
) -> JobStatus | None:
    """A poll's answer. Only a definite one moves the job, and only from `awaiting_gateway`, so
    polls and callbacks converge in any order, any number of times. Errors leave the job
    waiting for its next scheduled poll (pushed back to honour a Retry-After)."""
    now = utcnow()
    decision: Decision | None = None
    if result is not None:
        base = {"raw_status": result.raw_status}
        if result.outcome is Outcome.SUCCEEDED:
            decision = Decision(
                S.SUCCEEDED,
                {
                    **base,
                    "last_error_code": None,
                    "last_error_message": None,
                    "last_error_retryable": None,
                },
            )
        elif result.outcome is Outcome.DECLINED:
            decision = Decision(
                S.DECLINED,
                {
                    **base,
                    "last_error_code": result.code,
                    "last_error_message": result.message,
                    "last_error_retryable": False,
                },
            )
        elif result.outcome in (Outcome.NOT_FOUND, Outcome.UNRESOLVED, Outcome.FAILED):
            decision = Decision(
                S.UNKNOWN,
                {
                    **base,
                    "last_error_code": result.code or result.outcome.value.upper(),
                    "last_error_message": result.message,
                    "last_error_retryable": False,
                },
                note=f"status poll answered {result.outcome.value}: a human must look",
            )
    with write_session() as session:
        finish_check(session, attempt_id, result=result, error=error, duration_ms=duration_ms)
        if decision is None:
            values: dict[str, Any] = {"updated_at": now}
            if result is not None:
                values["raw_status"] = result.raw_status
            if error is not None:
                values.update(
                    last_error_code=error.code or type(error).__name__,
                    last_error_message=error.message,
                    last_error_retryable=True,
                )
            query = update(Job).where(
                col(Job.id) == claim.job_id, recheck(col(Job.status), S.AWAITING_GATEWAY.value)
            )
            if retry_after_floor is not None:
                scheduled = session.execute(
                    select(col(Job.next_poll_at)).where(col(Job.id) == claim.job_id)
                ).scalar_one_or_none()
                if scheduled is None or scheduled < retry_after_floor:
                    values["next_poll_at"] = retry_after_floor
            session.execute(query.values(**values).execution_options(synchronize_session=False))
            return None
        moved = transition(
            session,
            claim.job_id,
            from_statuses=[S.AWAITING_GATEWAY],
            to=decision.to,
            actor=claim.lease_owner,
            values=decision.values,
            note=decision.note,
        )
        return decision.to if moved else None


# ---------------------------------------------------------------------------------------------
# Operators and reconciliation.
# ---------------------------------------------------------------------------------------------

RESOLVABLE = (S.UNKNOWN, S.AWAITING_GATEWAY)


def operator_retry(job_id: str, *, actor: str, note: str | None, force: bool) -> JobStatus:
    """Re-drive a `failed` job — or, with `force`, an `unknown` one (which may refund twice if
    the earlier send did reach the gateway). The attempt budget starts afresh; a pending status
    check is kept, so a gateway that can be asked still is, before anything is sent."""
    from worker.errors import JobNotFound, TransitionRefused

    allowed = [S.FAILED, S.UNKNOWN] if force else [S.FAILED]
    now = utcnow()
    with write_session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.status == S.UNKNOWN.value and not force:
            raise TransitionRefused(
                f"job {job_id} is unknown: its last send may have reached the gateway, so a "
                "retry may refund twice; reconcile it, resolve it, or retry with --force"
            )
        if job.status not in {s.value for s in allowed}:
            raise TransitionRefused(
                f"job {job_id} is {job.status}; only failed (or, with --force, unknown) jobs "
                "can be retried"
            )
        moved = transition(
            session,
            job_id,
            from_statuses=[JobStatus(job.status)],
            to=S.QUEUED,
            actor=actor,
            values={
                "attempt_count": 0,
                "next_attempt_at": now,
                "message_due_at": now,
                "finished_at": None,
                "last_error_retryable": None,
            },
            note=note or ("forced retry of an unknown job" if force else "operator retry"),
            detail={"forced": force},
        )
        if not moved:
            raise TransitionRefused(f"job {job_id} changed meanwhile; look again")
    return S.QUEUED


def operator_resolve(job_id: str, to: JobStatus, *, actor: str, note: str) -> JobStatus:
    """An operator states the outcome of an `unknown` (or still awaiting) job, having checked
    with the gateway by other means. Recorded with who and why."""
    from worker.errors import JobNotFound, TransitionRefused

    if to not in (S.SUCCEEDED, S.DECLINED, S.FAILED):
        raise TransitionRefused("resolve to succeeded, declined or failed")
    if not note or not note.strip():
        raise TransitionRefused("say why (--note): the next operator will read it")
    with write_session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        current = JobStatus(job.status)
        if current not in RESOLVABLE or to not in TRANSITIONS[current]:
            raise TransitionRefused(
                f"job {job_id} is {current.value}; only unknown (or awaiting_gateway, to "
                "succeeded/declined) jobs can be resolved by hand"
            )
        moved = transition(
            session,
            job_id,
            from_statuses=[current],
            to=to,
            actor=actor,
            values={"last_error_retryable": False},
            note=note,
            event_kind="resolved",
        )
        if not moved:
            raise TransitionRefused(f"job {job_id} changed meanwhile; look again")
    return to


def reconcile_transition(
    job_id: str,
    *,
    from_status: JobStatus,
    result: GatewayResult,
    actor: str,
    poll_delays: Sequence[float],
    poll_deadline_seconds: float,
) -> JobStatus | None:
    """Correct a job the gateway has a definite answer for, through the state machine, with a
    `reconciled` event. None if the job moved meanwhile (the compare-and-set lost)."""
    now = utcnow()
    values: dict[str, Any] = {"raw_status": result.raw_status, "needs_status_check": False}
    if result.provider_reference:
        values["provider_reference"] = result.provider_reference
    if result.outcome is Outcome.SUCCEEDED:
        to = S.SUCCEEDED
        values.update(last_error_code=None, last_error_message=None, last_error_retryable=None)
    elif result.outcome is Outcome.DECLINED:
        to = S.DECLINED
        values.update(
            last_error_code=result.code,
            last_error_message=result.message,
            last_error_retryable=False,
        )
    elif result.outcome is Outcome.NOT_FOUND:
        to = S.FAILED
        values.update(
            last_error_code="NOT_AT_GATEWAY",
            last_error_message="the gateway never received it (reconciliation)",
            last_error_retryable=False,
        )
    elif result.outcome is Outcome.PENDING:
        to = S.AWAITING_GATEWAY
        values.update(
            next_poll_at=now + timedelta(seconds=poll_delays[0]),
            poll_deadline_at=now + timedelta(seconds=poll_deadline_seconds),
            poll_count=0,
            finished_at=None,
        )
    else:
        return None
    with write_session() as session:
        moved = transition(
            session,
            job_id,
            from_statuses=[from_status],
            to=to,
            actor=actor,
            values=values,
            note=f"reconciled: the gateway says {result.raw_status or result.outcome.value}",
            detail={"gateway_outcome": result.outcome.value, "code": result.code},
            event_kind="reconciled",
        )
    return to if moved else None
