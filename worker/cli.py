"""`refundq`: the operator's and producer's command line.

Exit codes: 0 success; 2 bad input (the message says what and why; nothing was stored);
1 anything else (a job that does not exist, a database or broker that cannot be reached).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import OperationalError, ProgrammingError

from providers.config import SettingsFileError
from worker.errors import IdempotencyConflict, InvalidRequest, JobNotFound, RefundqError
from worker.models import JobStatus

EXIT_BAD_INPUT = 2
EXIT_ERROR = 1

app = typer.Typer(
    name="refundq",
    help="Refunds and cancels that reach the payment gateway exactly once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
enqueue_app = typer.Typer(
    help="Queue a refund or a cancel (prints the job id).", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(enqueue_app, name="enqueue")
app.add_typer(db_app, name="db")

# Off a terminal (a pipe, a log file) rich would assume 80 columns and cut the table; widen it.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _fail(code: int, message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn refundq's errors into messages and exit codes."""
    try:
        yield
    except (InvalidRequest, IdempotencyConflict) as exc:
        _fail(EXIT_BAD_INPUT, str(exc))
    except JobNotFound as exc:
        _fail(EXIT_ERROR, str(exc))
    except (OperationalError, ProgrammingError) as exc:
        text = str(exc.orig) if exc.orig is not None else str(exc)
        if "no such table" in text or "does not exist" in text:
            _fail(EXIT_ERROR, "the database has no refundq tables yet: run `refundq db upgrade`")
        _fail(EXIT_ERROR, f"database error: {text.splitlines()[0]}")
    except RefundqError as exc:
        _fail(EXIT_ERROR, str(exc))
    except (SettingsFileError, ValidationError) as exc:
        _fail(EXIT_ERROR, f"configuration: {exc}")


def _parse_extras(pairs: list[str] | None) -> dict[str, str]:
    extras: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            _fail(EXIT_BAD_INPUT, f"--extra {pair!r}: use name=value")
        extras[name] = value
    return extras


def _print_job(view: Any, as_json: bool) -> None:
    if as_json:
        out.print_json(view.model_dump_json())
    else:
        out.print(view.id, highlight=False)


ProviderOpt = Annotated[
    str, typer.Option("--provider", "-p", help="vai247, bbmsl, vaultspay, pgv2")
]
PaymentRefOpt = Annotated[
    str, typer.Option(help="The gateway's reference of the original payment or order.")
]
KeyOpt = Annotated[
    str,
    typer.Option(help="Your key for this request; repeating it returns the same job."),
]
ReasonOpt = Annotated[str | None, typer.Option(help="Why (sent to the gateway).")]
ExtraOpt = Annotated[
    list[str] | None,
    typer.Option("--extra", help="Provider parameter name=value (repeatable)."),
]
NotifyOpt = Annotated[
    str | None, typer.Option(help="URL refundq POSTs the job to when it is final.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the job as JSON.")]


@enqueue_app.command("refund")
def enqueue_refund_cmd(
    provider: ProviderOpt,
    payment_ref: PaymentRefOpt,
    amount: Annotated[str, typer.Option(help='Amount to refund, e.g. "50.00".')],
    currency: Annotated[str, typer.Option(help="ISO 4217 code, e.g. USD.")],
    idempotency_key: KeyOpt,
    reason: ReasonOpt = None,
    original_amount: Annotated[
        str | None, typer.Option(help="The payment's amount: refunds never add up to more.")
    ] = None,
    extra: ExtraOpt = None,
    notify_url: NotifyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Refund AMOUNT of a payment."""
    from worker.client import enqueue_refund

    with _errors():
        view = enqueue_refund(
            provider=provider,
            payment_ref=payment_ref,
            amount=amount,
            currency=currency,
            idempotency_key=idempotency_key,
            reason=reason,
            original_amount=original_amount,
            notify_url=notify_url,
            extras=_parse_extras(extra),
        )
    _print_job(view, as_json)


@enqueue_app.command("cancel")
def enqueue_cancel_cmd(
    provider: ProviderOpt,
    payment_ref: PaymentRefOpt,
    idempotency_key: KeyOpt,
    reason: ReasonOpt = None,
    currency: Annotated[str | None, typer.Option(help="Optional ISO 4217 code.")] = None,
    extra: ExtraOpt = None,
    notify_url: NotifyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel an order that has not completed."""
    from worker.client import enqueue_cancel

    with _errors():
        view = enqueue_cancel(
            provider=provider,
            payment_ref=payment_ref,
            idempotency_key=idempotency_key,
            reason=reason,
            currency=currency,
            notify_url=notify_url,
            extras=_parse_extras(extra),
        )
    _print_job(view, as_json)


@app.command("show")
def show_cmd(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job id.")],
    as_json: JsonOpt = False,
) -> None:
    """One job: its state, its gateway calls and its history."""
    from worker.client import get_job_detail

    with _errors():
        detail = get_job_detail(job_id)
    if as_json:
        out.print_json(detail.model_dump_json())
        return
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for label, value in [
        ("job", detail.id),
        ("kind", detail.kind),
        ("provider", detail.provider),
        ("payment", detail.payment_ref),
        ("amount", f"{detail.amount} {detail.currency}" if detail.amount else "-"),
        ("status", _styled_status(detail.status)),
        ("gateway ref", detail.provider_reference or "-"),
        ("gateway status", detail.raw_status or "-"),
        ("attempts", str(detail.attempts)),
        (
            "last error",
            f"{detail.last_error.code}: {detail.last_error.message}" if detail.last_error else "-",
        ),
        ("created", str(detail.created_at)),
        ("updated", str(detail.updated_at)),
    ]:
        summary.add_row(label, value)
    out.print(summary)
    calls = Table(title="gateway calls", title_justify="left")
    for column in ("#", "purpose", "started", "ms", "http", "outcome", "code", "message"):
        calls.add_column(column)
    for attempt in detail.attempt_log:
        calls.add_row(
            str(attempt.number),
            attempt.purpose,
            attempt.started_at or "",
            f"{attempt.duration_ms:.0f}" if attempt.duration_ms is not None else "",
            str(attempt.http_status or ""),
            attempt.outcome or attempt.state,
            attempt.code or "",
            attempt.message or "",
        )
    out.print(calls)
    history = Table(title="history", title_justify="left")
    for column in ("at", "change", "by", "note"):
        history.add_column(column)
    for event in detail.events:
        change = (
            f"{event.from_status or '∅'} → {event.to_status}" if event.to_status else event.kind
        )
        history.add_row(event.at or "", change, event.actor, event.note or "")
    out.print(history)


STATUS_STYLE = {
    "succeeded": "green",
    "declined": "yellow",
    "failed": "red",
    "unknown": "bold magenta",
    "awaiting_gateway": "cyan",
}


def _styled_status(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


@app.command("list")
def list_cmd(
    status: Annotated[
        str | None, typer.Option(help=f"Only this status: {', '.join(s.value for s in JobStatus)}.")
    ] = None,
    provider: Annotated[str | None, typer.Option(help="Only this provider.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Jobs, newest first."""
    from worker.client import list_jobs

    with _errors():
        views = list_jobs(status=status, provider=provider, limit=limit)
    if as_json:
        out.print_json(json.dumps([json.loads(v.model_dump_json()) for v in views]))
        return
    table = Table()
    # The job id is what an operator copies into `refundq show`: never wrapped or cut.
    table.add_column("job", no_wrap=True, min_width=32)
    for column in ("kind", "provider", "payment", "amount", "status", "tries", "updated"):
        table.add_column(column)
    for view in views:
        table.add_row(
            view.id,
            view.kind,
            view.provider,
            view.payment_ref,
            f"{view.amount} {view.currency}" if view.amount else "",
            _styled_status(view.status),
            str(view.attempts),
            view.updated_at.strftime("%m-%d %H:%M:%S"),
        )
    out.print(table)


def _operator(by: str | None) -> str:
    import getpass

    return f"operator:{by or getpass.getuser()}"


ByOpt = Annotated[
    str | None, typer.Option("--by", help="Who is acting (default: your login name).")
]


@app.command("retry")
def retry_cmd(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job id.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Also re-drive an unknown job. Its last send may have reached the gateway: "
            "this can refund twice.",
        ),
    ] = False,
    note: Annotated[str | None, typer.Option(help="Why (kept in the job's history).")] = None,
    by: ByOpt = None,
) -> None:
    """Send a failed job again (or, with --force, an unknown one)."""
    from worker.client import get_job, publish_new
    from worker.errors import TransitionRefused
    from worker.jobs import operator_retry

    with _errors():
        view = get_job(job_id)
        if view.status == JobStatus.UNKNOWN.value and force:
            err.print(
                f"[bold yellow]warning:[/] job {job_id} is unknown: if its last send reached "
                f"{view.provider}, this retry refunds {view.amount or ''} {view.currency or ''} "
                "a second time.",
                highlight=False,
            )
        try:
            operator_retry(job_id, actor=_operator(by), note=note, force=force)
        except TransitionRefused as exc:
            _fail(EXIT_BAD_INPUT, str(exc))
    publish_new(job_id)  # the same outbox path as a new job
    err.print(f"job {job_id} queued again", highlight=False)


@app.command("resolve")
def resolve_cmd(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job id.")],
    as_status: Annotated[
        str, typer.Option("--as", help="succeeded, declined or failed.", show_default=False)
    ],
    note: Annotated[str, typer.Option(help="Why: what you checked, and where.")],
    by: ByOpt = None,
) -> None:
    """Record the outcome of an unknown job, after checking with the gateway by other means."""
    from worker.errors import TransitionRefused
    from worker.jobs import operator_resolve

    final = {s.value: s for s in (JobStatus.SUCCEEDED, JobStatus.DECLINED, JobStatus.FAILED)}
    if as_status not in final:
        _fail(EXIT_BAD_INPUT, f"--as must be one of {', '.join(final)}, not {as_status!r}")
    with _errors():
        try:
            operator_resolve(job_id, final[as_status], actor=_operator(by), note=note)
        except TransitionRefused as exc:
            _fail(EXIT_BAD_INPUT, str(exc))
    from worker.engine import on_settled

    on_settled(job_id)
    err.print(f"job {job_id} resolved as {as_status}", highlight=False)


@app.command("reconcile")
def reconcile_cmd(
    since: Annotated[
        str | None,
        typer.Option(
            help="Also check jobs finalised since this date (YYYY-MM-DD or ISO time; "
            "default: the last day)."
        ),
    ] = None,
    provider: Annotated[str | None, typer.Option(help="Only this provider.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    report_file: Annotated[
        Path | None, typer.Option("--report", help="Also write the JSON report here.")
    ] = None,
) -> None:
    """Compare jobs with the gateways, fix what is provably wrong, list what needs a human."""
    from datetime import UTC, datetime

    from rich.progress import Progress

    from worker.reconcile import reconcile

    moment = None
    if since is not None:
        try:
            moment = datetime.fromisoformat(since)
        except ValueError:
            _fail(EXIT_BAD_INPUT, f"--since {since!r}: use YYYY-MM-DD or an ISO 8601 time")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    with _errors(), Progress(console=err, transient=True) as bar:
        task = bar.add_task("asking the gateways", total=None)
        report = reconcile(
            since=moment,
            provider=provider,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    document = report.model_dump_json(indent=2)
    if report_file is not None:
        report_file.write_text(document + "\n", encoding="utf-8")
    if as_json:
        out.print_json(document)
        return
    _print_report(report)


def _print_report(report: Any) -> None:
    counts = Table(
        title=f"jobs by provider and state (checked {report.checked}, "
        f"{report.in_flight} in flight)",
        title_justify="left",
    )
    statuses = [s.value for s in JobStatus]
    counts.add_column("provider")
    for status in statuses:
        counts.add_column(status, justify="right")
    for provider, by_status in report.counts.items():
        counts.add_row(provider, *[str(by_status.get(s, "")) for s in statuses])
    out.print(counts)
    for title, findings in (
        ("corrected", report.corrected),
        ("needs a human", report.needs_human),
        ("could not ask", report.unreachable),
    ):
        table = Table(title=f"{title} ({len(findings)})", title_justify="left")
        for column in ("job", "provider", "payment", "held", "gateway", "now", "why"):
            table.add_column(column, no_wrap=column == "job")
        for f in findings:
            table.add_row(
                f.job_id,
                f.provider,
                f.payment_ref,
                f.held,
                f.gateway or "-",
                _styled_status(f.now),
                f.why,
            )
        out.print(table)


@db_app.command("upgrade")
def db_upgrade_cmd(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Create or migrate the database to the latest schema."""
    from worker.migrate import current_revision, upgrade
    from worker.settings import get_settings

    url = get_settings().database_url
    with _errors():
        upgrade(url, revision)
        at = current_revision(url)
    err.print(f"database at revision {at}", highlight=False)


@app.command("sandbox")
def sandbox_cmd(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8099,
    keys_dir: Annotated[
        Path,
        typer.Option(help="Where to write a throwaway bbmsl key pair (if none is configured)."),
    ] = Path(".refundq-sandbox"),
    env_file: Annotated[
        Path | None,
        typer.Option(help="Also write the worker's REFUNDQ_* lines to this file."),
    ] = None,
) -> None:
    """Serve simulators of the four gateways (for development and tests).

    Prints the REFUNDQ_* settings a worker needs to talk to them. The simulators are a
    development tool: only this command loads them, never the worker or the API.
    """
    # Imported here and nowhere else in worker/: the runtime never loads the simulators.
    from sandbox.config import SandboxConfig
    from sandbox.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_bbmsl_keypair
    from sandbox.serve import env_lines, run

    config = SandboxConfig()
    private_key_path: Path | None = None
    if not config.bbmsl_public_key:
        # Reuse a pair made by an earlier start: a worker already signing with that private key
        # keeps working when only the sandbox restarts.
        private_key_path = keys_dir / PRIVATE_KEY_NAME
        public_key_path = keys_dir / PUBLIC_KEY_NAME
        if not (private_key_path.is_file() and public_key_path.is_file()):
            private_key_path, public_key_path = generate_bbmsl_keypair(keys_dir)
        config = config.model_copy(update={"bbmsl_public_key": public_key_path.read_text()})
    lines = env_lines(f"http://{host}:{port}", config, private_key_path)
    err.print("# settings for a worker talking to this sandbox:", highlight=False)
    for line in lines:
        print(line, file=sys.stderr)
    if env_file is not None:
        env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run(host=host, port=port, config=config)


# ---- apikey commands (HTTP API) -------------------------------------------------------------

apikey_app = typer.Typer(
    help="API keys for the HTTP API (stored as salted hashes; docs/http-api.md).",
    no_args_is_help=True,
)
app.add_typer(apikey_app, name="apikey")


@apikey_app.command("create")
def apikey_create_cmd(
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME",
            help="Whose key (a shop's back end): letters, digits, '_', '.', '-'. Its "
            "Idempotency-Keys are scoped by it.",
        ),
    ],
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Append the hash here (default: REFUNDQ_API_KEYS_FILE, else ./refundq-api-keys).",
        ),
    ] = None,
) -> None:
    """Make an API key: its hash goes to the keys file the API reads, the key itself is printed
    once, as the last line, and stored nowhere."""
    from worker import apikeys
    from worker.settings import get_settings

    configured = get_settings().api_keys_file
    target = file or configured
    with _errors():
        key, stored = apikeys.new_key(name)
    try:
        apikeys.append_key(target, stored)
    except OSError as exc:
        _fail(EXIT_ERROR, f"cannot write {target}: {exc.strerror}")
    err.print(
        f"API key {stored.key_id} for {name!r} created; its hash is in {target.resolve()}. "
        "The key is shown below, once: refundq keeps only its hash.",
        highlight=False,
    )
    if target.resolve() != configured.resolve():
        err.print(
            f"[bold yellow]note:[/] the API reads {configured.resolve()}; set "
            f"REFUNDQ_API_KEYS_FILE={target} for it to read this key",
            highlight=False,
        )
    typer.echo(key)


@apikey_app.command("list")
def apikey_list_cmd() -> None:
    """The API keys the API accepts now: name and key id (never a key; they are not stored)."""
    from worker.apikeys import keyring

    table = Table()
    for column in ("name", "key id"):
        table.add_column(column)
    for stored_keys in keyring.keys().values():
        for stored in stored_keys:
            table.add_row(stored.name, stored.key_id)
    out.print(table)


# ---- demo -------------------------------------------------------------------------------------


@app.command("demo")
def demo_cmd(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the work directory (database, logs, keys).")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show every admin call and job change.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=5, help="Seconds to wait for the jobs before giving up.")
    ] = 45.0,
) -> None:
    """Everything on this machine: sandbox gateways, a worker, beat and a mix of jobs.

    Broker: REFUNDQ_BROKER_URL, else Redis on localhost:6379, else a private redis-server.

    A fresh temporary SQLite database; every process it starts is stopped at the end.

    Exit code 0 only if every job ends in its expected state.
    """
    from worker.demo import run_demo

    raise typer.Exit(run_demo(keep=keep, verbose=verbose, timeout=timeout))


def main() -> None:
    import os

    from worker.logs import configure_logging

    # The CLI's own output is for people; library chatter only when asked for.
    configure_logging(os.environ.get("REFUNDQ_LOG_LEVEL", "WARNING"))
    app()


if __name__ == "__main__":
    main()
