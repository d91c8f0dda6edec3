"""`refundq demo`: all of refundq on this machine, end to end, in well under a minute.

What it does, in order:

1. Finds a Redis: `REFUNDQ_BROKER_URL` if it answers, else the Redis on localhost:6379, else a
   private `redis-server` it starts, else it says how to get one (exit 1). On a Redis it does not
   own it uses a logical database nobody uses (no keys, no clients), so it can neither steal nor
   leave behind anyone's messages.
2. Makes a temporary directory with a fresh SQLite database, and starts the sandbox gateways, a
   Celery worker and Celery beat as child processes, with fast *demo* timings.
3. Sets up each scenario's gateway-side state through the sandbox admin API (payments, their
   status, injected faults), enqueues the jobs through the producer API, and shows them moving.
   The two vaultspay refunds are settled the way finance would settle them: the demo moves their
   refund requests through the admin API. One settles by its callback to refundq's webhook
   (`uvicorn worker.api:app`); for the other the demo takes the webhook down first, so its
   callback is lost and refundq's polls settle it.
4. Prints every job's final state against the expected one, with what the gateway's own ledger
   recorded, and exits 0 only if all match. Every process it started is stopped, whatever happens
   (Ctrl-C included); a child also gets SIGTERM if the demo itself is killed (Linux).

The sandbox is a development tool: only its child process loads it, never this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# Where the demo looks for "the Redis on localhost". Only the tests change it (to check the
# message a machine without any Redis gets, on a machine that has one).
LOCAL_REDIS_ENV = "REFUNDQ_DEMO_LOCAL_REDIS_URL"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379"
SHARED_REDIS_DBS = range(1, 16)

FINAL = frozenset({"succeeded", "declined", "failed", "unknown"})
TICK_SECONDS = 0.2
STARTUP_TIMEOUT_SECONDS = 30.0
STOP_GRACE_SECONDS = 5.0
LOG_TAIL_LINES = 25

# Demo timings: seconds where production waits minutes. The invariants `Settings` checks still
# hold (time limit < lease, HTTP timeouts < time limit); the values are those the integration
# tests run with (tests/support/stack.py), except the poll schedule: its first wait is 2 s so that
# the callback scenario's callback always comes before the first scheduled poll.
DEMO_TIMINGS: dict[str, str] = {
    "REFUNDQ_LEASE_SECONDS": "6",
    "REFUNDQ_TASK_TIME_LIMIT_SECONDS": "5",
    "REFUNDQ_HTTP_TIMEOUT_SECONDS": "3",
    "REFUNDQ_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "REFUNDQ_RETRY_BASE_SECONDS": "0.2",
    "REFUNDQ_RETRY_FLOOR_SECONDS": "0.1",
    "REFUNDQ_RETRY_CAP_SECONDS": "2",
    "REFUNDQ_DISPATCH_INTERVAL_SECONDS": "0.5",
    "REFUNDQ_REAP_INTERVAL_SECONDS": "0.5",
    "REFUNDQ_POLL_INTERVAL_SECONDS": "0.5",
    "REFUNDQ_REDISPATCH_AFTER_SECONDS": "2",
    "REFUNDQ_POLL_SCHEDULE_SECONDS": "[2, 1]",
}
DEMO_TIMINGS_TEXT = (
    "demo timings, not production defaults: vaultspay polls 2 s after acceptance, then every "
    "1 s (production: 1, 2, 5, 15, 30 min, then hourly); retries after 0.1-0.3 s, doubling "
    "(production: 1-3 s); beat sweeps every 0.5 s (production: 5 s)"
)

STATUS_STYLE = {
    "succeeded": "green",
    "declined": "yellow",
    "failed": "red",
    "unknown": "bold magenta",
    "awaiting_gateway": "cyan",
    "retry_wait": "blue",
}


# ---- scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What a scenario must end in. `applied` is how many entries the gateway's own ledger must
    hold for the payment: the "exactly once" half of the check."""

    status: str
    applied: int
    attempts: int | None = None
    code: str | None = None
    via: str | None = None  # vaultspay: "poll" or "callback"

    def label(self) -> str:
        parts = [self.status]
        if self.code:
            parts.append(self.code)
        if self.via:
            parts.append(f"by {self.via}")
        if self.attempts is not None:
            parts.append(f"after {_tries(self.attempts)}")
        return " ".join(parts)


@dataclass(frozen=True)
class Scenario:
    number: int
    gateway: str
    title: str
    kind: str  # "refund" | "cancel"
    payment_amount: str
    currency: str
    expected: Expected
    setup: str  # the sandbox admin calls, in words
    amount: str | None = None
    original_amount: str | None = None
    payment_status: str | None = None
    fault: Mapping[str, Any] | None = None
    settle: str | None = None  # vaultspay: the demo settles it "by_poll" or "by_callback"
    explain: str | None = None  # why the outcome is what it is, printed under the final table


def scenarios() -> list[Scenario]:
    """The mix: every gateway, full and partial refunds, cancels, refusals, a retry, both ways
    vaultspay settles, and one send whose fate cannot be known."""
    return [
        Scenario(
            1, "vai247", "full refund", "refund", "80.00", "USD",
            Expected("succeeded", applied=1),
            "order 80.00 USD, completed",
            amount="80.00", original_amount="80.00",
        ),
        Scenario(
            2, "vai247", "partial refund", "refund", "120.00", "USD",
            Expected("succeeded", applied=1),
            "order 120.00 USD, completed",
            amount="45.50", original_amount="120.00",
        ),
        Scenario(
            3, "vai247", "cancel, order pending", "cancel", "60.00", "USD",
            Expected("succeeded", applied=1),
            "order 60.00 USD, status pending",
            payment_status="pending",
        ),
        Scenario(
            4, "vai247", "cancel, order completed", "cancel", "60.00", "USD",
            Expected("declined", applied=0, code="ORDER_NOT_CANCELLABLE"),
            "order 60.00 USD, completed (must be refunded, not cancelled)",
        ),
        Scenario(
            5, "vai247", "refund, answer lost", "refund", "30.00", "USD",
            Expected("unknown", applied=1, attempts=1),
            "order 30.00 USD; fault apply_then_drop once (applied, then the connection drops)",
            amount="30.00",
            fault={"kind": "apply_then_drop", "endpoint": "refund", "times": 1},
            explain="vai247 has neither an idempotency key nor a status query: a send whose "
            "answer was lost is unknown, never resent; an operator (refundq resolve) or "
            "reconciliation decides.",
        ),
        Scenario(
            6, "bbmsl", "full refund", "refund", "100.00", "HKD",
            Expected("succeeded", applied=1),
            "order 100.00 HKD, SUCCESS",
            amount="100.00", original_amount="100.00",
        ),
        Scenario(
            7, "bbmsl", "partial refund", "refund", "100.00", "HKD",
            Expected("succeeded", applied=1),
            "order 100.00 HKD, SUCCESS",
            amount="35.50", original_amount="100.00",
        ),
        Scenario(
            8, "bbmsl", "refund, already refunded", "refund", "50.00", "HKD",
            Expected("declined", applied=0, code="3002"),
            "order 50.00 HKD, status REFUNDED (refunded in the merchant portal)",
            amount="10.00", payment_status="REFUNDED",
        ),
        Scenario(
            9, "pgv2", "full refund, 503 first", "refund", "250.00", "INR",
            Expected("succeeded", applied=1, attempts=2),
            "payment 250.00 INR; fault error 503 once on refund",
            amount="250.00", original_amount="250.00",
            fault={"kind": "error", "endpoint": "refund", "status": 503, "times": 1},
            explain="a 503 means the gateway (or its load balancer) did not process the request: "
            "refundq waited a backoff and sent it again, under the same merchantRefundNo (the "
            "job id), on which pgv2 is idempotent in any case.",
        ),
        Scenario(
            10, "pgv2", "partial refund", "refund", "250.00", "INR",
            Expected("succeeded", applied=1),
            "payment 250.00 INR",
            amount="100.05", original_amount="250.00",
        ),
        Scenario(
            11, "vaultspay", "full refund, by polling", "refund", "120.00", "AED",
            Expected("succeeded", applied=1, via="poll"),
            "payment 120.00 AED; the demo moves the request 0 → 1 → 2 as refundq polls, and "
            "takes refundq's webhook down before the 2",
            amount="120.00", original_amount="120.00", settle="by_poll",
            explain="refundq's webhook was down when vaultspay called back, and vaultspay "
            "documents no resend: the callback was lost, and refundq's scheduled polls settled "
            "the job anyway.",
        ),
        Scenario(
            12, "vaultspay", "partial refund, by callback", "refund", "80.00", "AED",
            Expected("succeeded", applied=1, via="callback"),
            "payment 80.00 AED; the demo moves the request to 2 as soon as vaultspay accepts it",
            amount="30.00", original_amount="80.00", settle="by_callback",
            explain="vaultspay's callbacks are not signed: refundq's webhook took this one as a "
            "hint and settled the job on the status call it triggered, before any scheduled poll.",
        ),
    ]  # fmt: skip


@dataclass
class Track:
    """A scenario as it runs: its payment, its job, and where the demo's own steps stand."""

    scenario: Scenario
    payment_ref: str
    job_id: str | None = None
    view: Any = None  # worker.views.JobView
    detail: Any = None  # worker.views.JobDetail
    step: str = "start"
    note: str = ""

    @property
    def status(self) -> str:
        return str(self.view.status) if self.view is not None else "-"

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def polls_done(self) -> int:
        if self.detail is None:
            return 0
        return sum(1 for a in self.detail.attempt_log if a.purpose == "poll" and a.state == "done")


# ---- errors --------------------------------------------------------------------------------------


class DemoError(Exception):
    """The demo could not run (no Redis, a child that would not start); the message says why."""


class NoRedis(DemoError):
    pass


class _Terminated(BaseException):
    """SIGTERM to the demo: unwind like Ctrl-C, so every child is stopped."""


# ---- child processes -----------------------------------------------------------------------------


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
PR_SET_PDEATHSIG = 1


def _die_with_the_demo(demo_pid: int) -> None:
    """In the child, before exec: get SIGKILL when the demo dies, even by SIGKILL (Linux), so
    no worker, beat, sandbox or Redis outlives a demo that could not clean up. SIGKILL rather
    than SIGTERM: everything the demo runs is thrown away with it, and a SIGTERM can go
    unanswered by a process still starting up (a loaded machine left a Celery worker running
    30 s after the demo died). A prefork worker's pool dies with its parent (Celery sets the
    same signal for it)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != demo_pid:
        # The demo died between fork and prctl: the signal will never come.
        os._exit(1)


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stopped_on_purpose: bool = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class Children:
    """Every process the demo started, each in its own process group (a prefork worker's pool
    stops with it), stopped together: SIGTERM, a grace period, then SIGKILL."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Child] = []

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> Child:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(  # noqa: S603 - our own interpreter and redis-server
                argv,
                cwd=self.workdir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # The demo runs no threads of its own (rich's Live is refreshed by hand), which
                # is what makes a pre-exec hook safe.
                preexec_fn=functools.partial(_die_with_the_demo, os.getpid()),  # noqa: PLW1509
            )
        child = Child(name, popen, log_path)
        self.started.append(child)
        return child

    def get(self, name: str) -> Child | None:
        return next((c for c in self.started if c.name == name), None)

    def stop(self, child: Child) -> None:
        """Stop one child on purpose (the demo takes refundq's webhook down)."""
        child.stopped_on_purpose = True
        _signal_group(child, signal.SIGTERM)
        self._wait([child])

    def stop_all(self) -> int:
        """Stop everything; returns how many processes were still running."""
        running = [c for c in self.started if c.alive()]
        # Redis last: the worker and beat say goodbye to it on a warm shutdown.
        order = sorted(running, key=lambda c: c.name == "redis")
        for child in order:
            if child.name != "redis":
                _signal_group(child, signal.SIGTERM)
        self._wait([c for c in order if c.name != "redis"])
        for child in order:
            if child.name == "redis":
                _signal_group(child, signal.SIGTERM)
        self._wait([c for c in order if c.name == "redis"])
        for child in self.started:
            # Whatever is left of a group (a pool process whose parent exited first).
            _signal_group(child, signal.SIGKILL)
        return len(running)

    @staticmethod
    def _wait(children: list[Child]) -> None:
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in children:
            try:
                child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.popen.wait(timeout=STOP_GRACE_SECONDS)


def _signal_group(child: Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.popen.pid, sig)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---- the broker ----------------------------------------------------------------------------------


@dataclass
class Broker:
    url: str
    story: str  # one line: which Redis, which logical database, and why
    # A logical database of a Redis the demo does not own, found empty: emptied again at the end,
    # or every run would leave Celery's bindings behind and the next run would need another one.
    borrowed: bool = False

    def give_back(self) -> str | None:
        """Empty the borrowed logical database; None, or why it could not."""
        import redis

        if not self.borrowed:
            return None
        try:
            client = _redis(self.url)
            client.flushdb()
            client.close()
        except redis.RedisError as exc:
            return f"could not empty {_redacted(self.url)}: {exc}"
        return None


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def _url_db(url: str) -> int | None:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else None


def _redis(url: str, db: int | None = None) -> Any:
    import redis

    return redis.Redis.from_url(
        url if db is None else _with_db(url, db), socket_connect_timeout=1, socket_timeout=2
    )


def _answers(url: str) -> bool:
    import redis

    try:
        return bool(_redis(url).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _free_db(url: str, preferred: int | None) -> int | None:
    """A logical database with no keys and no other client on it (a worker idling on an empty
    queue holds no keys, but it is connected): `preferred` if free, else one of 1..15 at random."""
    import redis

    probe = _redis(url, 0)
    busy: set[int] = set()
    with contextlib.suppress(redis.RedisError):
        me = probe.client_id()
        busy = {int(c.get("db", 0)) for c in probe.client_list() if int(c["id"]) != me}
    candidates = random.sample(SHARED_REDIS_DBS, len(SHARED_REDIS_DBS))
    if preferred is not None:
        candidates.insert(0, preferred)
    for db in candidates:
        if db in busy:
            continue
        try:
            client = _redis(url, db)
            empty = client.dbsize() == 0
            client.close()
        except redis.RedisError:
            continue  # a database number this server does not have
        if empty:
            return db
    return None


def _shared_broker(url: str, preferred: int | None, source: str) -> Broker:
    db = _free_db(url, preferred)
    if db is None:
        raise DemoError(
            f"the Redis at {_redacted(url)} has no free logical database (1-15 all hold keys or "
            "have clients); set REFUNDQ_BROKER_URL to another Redis"
        )
    chosen = _with_db(url, db)
    why = (
        f"database {db} as given"
        if db == preferred
        else f"logical database {db}, which nobody else uses"
    )
    return Broker(chosen, f"{source}: {_redacted(chosen)} ({why})", borrowed=True)


def find_broker(children: Children, env: Mapping[str, str], say: Callable[[str], None]) -> Broker:
    """`REFUNDQ_BROKER_URL` if set and answering; else Redis on localhost:6379; else a private
    `redis-server`; else `NoRedis`, whose message says how to get one."""
    tried: list[str] = []
    given = env.get("REFUNDQ_BROKER_URL") or None
    if given is not None:
        if not given.startswith(("redis://", "rediss://")):
            return Broker(given, f"REFUNDQ_BROKER_URL: {_redacted(given)} (used as given)")
        if _answers(given):
            return _shared_broker(given, _url_db(given) or 0, "REFUNDQ_BROKER_URL")
        say(f"REFUNDQ_BROKER_URL={_redacted(given)} does not answer; looking for another Redis")
        tried.append(f"REFUNDQ_BROKER_URL={_redacted(given)} does not answer")
    else:
        tried.append("REFUNDQ_BROKER_URL is not set")
    local = env.get(LOCAL_REDIS_ENV) or LOCAL_REDIS_URL
    if _answers(local):
        return _shared_broker(local, None, "the Redis on localhost")
    tried.append(f"nothing answers at {_redacted(local)}")
    binary = shutil.which("redis-server")
    if binary is None:
        tried.append("redis-server is not installed (not on PATH)")
        raise NoRedis(_no_redis_message(tried))
    return _private_redis(children, binary)


def _private_redis(children: Children, binary: str) -> Broker:
    port = _free_port()
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(children.workdir),
    ]  # fmt: skip
    child = children.spawn("redis", argv, os.environ)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _answers(url):
        if not child.alive() or time.monotonic() > deadline:
            raise DemoError(f"the private redis-server did not start:\n{child.tail()}")
        time.sleep(0.05)
    return Broker(url, f"a private redis-server on port {port} (stopped at the end)")


def _no_redis_message(tried: list[str]) -> str:
    lines = [
        "refundq demo needs Redis (the Celery broker) and found none:",
        *(f"  - {reason}" for reason in tried),
        "Get one, then run `refundq demo` again:",
        "  - install it: sudo apt-get install redis-server   (Debian/Ubuntu; macOS: brew install "
        "redis; in a refundq checkout scripts/setup does it). The demo starts a private one if "
        "redis-server is on PATH.",
        "  - or point the demo at one you have: export REFUNDQ_BROKER_URL=redis://HOST:6379/0",
    ]
    return "\n".join(lines)


# ---- the gateways' credentials ---------------------------------------------------------------


def _gateway_credentials(keys_dir: Path, base_url: str) -> tuple[dict[str, str], dict[str, str]]:
    """Fresh credentials for this run: (the sandbox's settings, plus `public_key_file`; the
    worker's settings). The bbmsl key pair is RSA 2048 as BBMSL exchanges them: the private half
    PKCS#8 PEM, created 0600, for the worker; the public half for the sandbox."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys_dir.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_path = keys_dir / "bbmsl_private.pem"
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    public_path = keys_dir / "bbmsl_public.pem"
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    shared = {
        "VAI247_APP_ID": "demo-vai247",
        "VAI247_API_KEY": secrets.token_hex(16),
        "BBMSL_MERCHANT_ID": "3",
        "VAULTSPAY_CLIENT_ID": "demo-vaultspay",
        "VAULTSPAY_CLIENT_SECRET": secrets.token_hex(16),
        "PGV2_APP_ID": "demo-pgv2",
        "PGV2_APP_SECRET": secrets.token_hex(16),
    }
    sandbox = {f"REFUNDQ_SANDBOX_{name}": value for name, value in shared.items()}
    sandbox["public_key_file"] = str(public_path)
    worker = {f"REFUNDQ_{name}": value for name, value in shared.items()}
    for gateway in ("VAI247", "BBMSL", "VAULTSPAY", "PGV2"):
        worker[f"REFUNDQ_{gateway}_BASE_URL"] = base_url
    worker["REFUNDQ_BBMSL_PRIVATE_KEY_FILE"] = str(private_path)
    return sandbox, worker


# ---- the sandbox admin API -----------------------------------------------------------------------


class SandboxAdmin:
    """The few admin calls the demo makes; each one can be echoed (`--verbose`)."""

    def __init__(self, base_url: str, echo: Callable[[str], None] | None) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url + "/_admin", timeout=10)
        self.echo = echo

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        response = self.http.request(method, path, json=body)
        if self.echo is not None:
            shown = f" {json.dumps(body)}" if body is not None else ""
            self.echo(f"sandbox: {method} /_admin{path}{shown} → {response.status_code}")
        if response.is_error:
            raise DemoError(
                f"sandbox admin {method} {path} answered {response.status_code}: {response.text}"
            )
        return response.json() if response.content else None

    def answers(self) -> bool:
        try:
            return self.http.get("/faults", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def create_payment(
        self, gateway: str, payment_ref: str, amount: str, currency: str, status: str | None
    ) -> None:
        body = {"payment_ref": payment_ref, "amount": amount, "currency": currency}
        if status is not None:
            body["status"] = status
        self._call("POST", f"/{gateway}/payments", body)

    def add_fault(self, gateway: str, payment_ref: str, rule: Mapping[str, Any]) -> None:
        self._call("POST", "/faults", {"gateway": gateway, **rule, "payment_ref": payment_ref})

    def set_vaultspay_status(self, refund_uuid: str, status: int) -> None:
        self._call("POST", f"/vaultspay/refund-requests/{refund_uuid}/status", {"status": status})

    def callbacks(self, refund_uuid: str) -> list[dict[str, Any]]:
        # Read without echo: the demo asks this every tick while it waits.
        response = self.http.get("/calls", params={"gateway": "vaultspay", "endpoint": "callback"})
        response.raise_for_status()
        return [c for c in response.json()["calls"] if c.get("key") == refund_uuid]

    def ledger(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/ledger")["entries"])


# ---- the demo ------------------------------------------------------------------------------------


class Demo:
    def __init__(self, console: Console, *, keep: bool, verbose: bool, timeout: float) -> None:
        self.console = console
        self.keep = keep
        self.verbose = verbose
        self.timeout = timeout
        self.started_at = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="refundq-demo-"))
        self.children = Children(self.workdir)
        self.env: dict[str, str] = {}
        self.admin: SandboxAdmin | None = None
        self.tracks: list[Track] = []
        self.api_port = _free_port()
        self.run_id = secrets.token_hex(3)
        self.live: Live | None = None
        self.broker: Broker | None = None
        self.failure: str | None = None

    # --- output -----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def say(self, message: str) -> None:
        self.console.print(f"[dim]{self.elapsed():5.1f}s[/] {message}", highlight=False)

    def detail_line(self, message: str) -> None:
        if self.verbose:
            self.say(f"[dim]{escape(message)}[/]")

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        saved_env = {k: v for k, v in os.environ.items() if k.startswith("REFUNDQ_")}
        previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
        outcome: int | None = None
        try:
            outcome = self._run(saved_env)
        except NoRedis as exc:
            self.console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            outcome = 1
        except DemoError as exc:
            self.failure = str(exc)
            outcome = 1
        except (KeyboardInterrupt, _Terminated):
            self.console.print("[yellow]interrupted[/]: stopping everything the demo started")
            outcome = 130
        finally:
            self._stop()
            signal.signal(signal.SIGTERM, previous_term)
            _restore_env(saved_env)
            if outcome is None:  # an unexpected error is on its way up
                self.console.print(f"logs kept in {self.workdir}", highlight=False)
        self._leave(outcome)
        return outcome

    def _stop(self) -> None:
        """Stop every process the demo started, and give back what it borrowed."""
        if self.live is not None:
            self.live.stop()
        if self.admin is not None:
            self.admin.close()
        stopped = self.children.stop_all()
        trouble = self.broker.give_back() if self.broker is not None else None
        if trouble is not None:
            self.console.print(f"[yellow]warning:[/] {escape(trouble)}", highlight=False)
        if stopped:
            self.say(f"stopped the {stopped} processes the demo started")

    def _leave(self, outcome: int) -> None:
        """Say what went wrong, if anything, and keep or remove the work directory."""
        if self.failure is not None:
            self.console.print(f"[bold red]error:[/] {escape(self.failure)}", highlight=False)
        if outcome == 1 and self.children.started:
            self._print_logs()
            self.console.print(
                f"logs, database and keys kept in {self.workdir}", highlight=False, soft_wrap=True
            )
        elif self.keep:
            self._print_kept()
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _run(self, saved_env: Mapping[str, str]) -> int:
        self.broker = broker = find_broker(self.children, saved_env, self.say)
        self.say(f"broker: {escape(broker.story)}")
        self._start(broker)
        self._set_up()
        all_final = self._watch()
        return 0 if self._report(all_final) else 1

    # --- starting the stack ------------------------------------------------------------------

    def _start(self, broker: Broker) -> None:
        database = self.workdir / "refundq.db"
        sandbox_url = f"http://127.0.0.1:{_free_port()}"
        # The demo chooses the gateways' credentials and hands each side its half: the sandbox
        # its REFUNDQ_SANDBOX_* settings and the bbmsl public key, the worker its REFUNDQ_*
        # settings and the private key. So all processes start at once.
        sandbox_settings, gateway_settings = _gateway_credentials(
            self.workdir / "keys", sandbox_url
        )
        self.env = {
            "REFUNDQ_BROKER_URL": broker.url,
            "REFUNDQ_DATABASE_URL": f"sqlite:///{database}",
            "REFUNDQ_WEBHOOK_SECRET": secrets.token_hex(16),
            "REFUNDQ_VAULTSPAY_CALLBACK_BASE_URL": self._api_url(),
            "REFUNDQ_LOG_LEVEL": "INFO",
            **gateway_settings,
            **DEMO_TIMINGS,
        }
        self.say(f"database: {database} (new, SQLite)")
        self.say(f"[dim]{DEMO_TIMINGS_TEXT}[/]")
        python = sys.executable
        port = sandbox_url.rsplit(":", 1)[1]
        sandbox = self.children.spawn(
            "sandbox",
            [
                python, "-m", "sandbox", "--host", "127.0.0.1", "--port", port,
                "--bbmsl-public-key-file", sandbox_settings.pop("public_key_file"),
            ],
            {**self._child_env(), **sandbox_settings},
        )  # fmt: skip
        self._activate()
        from worker.migrate import upgrade

        # Before the worker and beat start, so that their first sweeps find the tables.
        upgrade(self.env["REFUNDQ_DATABASE_URL"])
        worker = self.children.spawn(
            "worker",
            [
                python, "-m", "celery", "-A", "worker.app", "worker",
                "--loglevel", "INFO", "--concurrency", "4", "--hostname", "demo@%h",
                "--without-mingle", "--without-gossip",
            ],
            self._child_env(),
        )  # fmt: skip
        beat = self.children.spawn(
            "beat",
            [
                python, "-m", "celery", "-A", "worker.app", "beat",
                "--loglevel", "INFO", "--max-interval", "1",
            ],
            self._child_env(),
        )  # fmt: skip
        api = self._start_api()
        self.admin = SandboxAdmin(sandbox_url, self.detail_line if self.verbose else None)
        self._wait("the sandbox", self.admin.answers, sandbox)
        self.say(f"sandbox: the four gateways on {sandbox_url} (python -m sandbox)")
        self._wait("the worker", lambda: "ready." in worker.log(), worker)
        self.say("worker: celery -A worker.app worker (4 processes)")
        self._wait("beat", lambda: "beat: Starting" in beat.log(), beat)
        self.say("beat: celery -A worker.app beat")
        self._wait("refundq's webhook", self._api_answers, api)
        self.say(f"webhook (vaultspay callbacks): uvicorn worker.api:app on {self._api_url()}")

    def _child_env(self) -> dict[str, str]:
        repo = str(Path(__file__).resolve().parents[1])
        base = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDQ_")}
        path = os.pathsep.join(p for p in (repo, base.get("PYTHONPATH", "")) if p)
        return {**base, **self.env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}

    def _activate(self) -> None:
        """Make this process the producer of the demo's stack (and nothing else)."""
        for name in [k for k in os.environ if k.startswith("REFUNDQ_")]:
            del os.environ[name]
        os.environ.update(self.env)
        _reset_process_state()

    def _wait(self, what: str, ready: Callable[[], bool], child: Child) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not ready():
            if not child.alive():
                raise DemoError(f"{child.name} exited while starting; see its log below")
            if time.monotonic() > deadline:
                raise DemoError(f"{what} did not start within {STARTUP_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.05)

    def _api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _start_api(self) -> Child:
        return self.children.spawn(
            "api",
            [
                sys.executable, "-m", "uvicorn", "worker.api:app",
                "--host", "127.0.0.1", "--port", str(self.api_port),
                "--log-level", "warning", "--no-access-log",
            ],
            self._child_env(),
        )  # fmt: skip

    def _api_answers(self) -> bool:
        try:
            return httpx.get(f"{self._api_url()}/healthz", timeout=1).is_success
        except httpx.HTTPError:
            return False

    # --- scenarios ---------------------------------------------------------------------------

    def _set_up(self) -> None:
        admin = self.admin
        assert admin is not None
        preface = Table(
            title="the mix (set up through the sandbox admin API)", title_justify="left"
        )
        for column in ("#", "gateway", "scenario", "sandbox setup", "expected"):
            preface.add_column(column, no_wrap=column in ("#", "gateway"))
        for scenario in scenarios():
            track = Track(scenario, f"demo-{self.run_id}-{scenario.number:02d}")
            admin.create_payment(
                scenario.gateway,
                track.payment_ref,
                scenario.payment_amount,
                scenario.currency,
                scenario.payment_status,
            )
            if scenario.fault is not None:
                admin.add_fault(scenario.gateway, track.payment_ref, scenario.fault)
            self.tracks.append(track)
            preface.add_row(
                str(scenario.number),
                scenario.gateway,
                _scenario_text(scenario),
                scenario.setup,
                scenario.expected.label(),
            )
        self.console.print(preface)
        # vaultspay first: settling takes a few polls, the longest path of the demo.
        for track in sorted(self.tracks, key=lambda t: t.scenario.settle is None):
            self._enqueue(track)
        self.say(f"enqueued {len(self.tracks)} jobs")

    def _enqueue(self, track: Track) -> None:
        from worker.client import enqueue_cancel, enqueue_refund

        scenario = track.scenario
        key = f"demo-{self.run_id}-{scenario.number}"
        reason = "Customer request (refundq demo)"
        if scenario.kind == "cancel":
            view = enqueue_cancel(
                provider=scenario.gateway,
                payment_ref=track.payment_ref,
                idempotency_key=key,
                reason=reason,
            )
        else:
            assert scenario.amount is not None
            view = enqueue_refund(
                provider=scenario.gateway,
                payment_ref=track.payment_ref,
                amount=scenario.amount,
                currency=scenario.currency,
                idempotency_key=key,
                reason=reason,
                original_amount=scenario.original_amount,
            )
        track.job_id = view.id
        track.view = view
        self.detail_line(f"#{scenario.number}: enqueued job {view.id}")

    # --- watching ----------------------------------------------------------------------------

    def _watch(self) -> bool:
        """Refresh every job, take the demo's own steps, until all are final. False on time-out."""
        deadline = time.monotonic() + self.timeout
        narrate = self.verbose or not self.console.is_terminal
        with Live(
            self._progress(), console=self.console, auto_refresh=False, transient=True
        ) as live:
            self.live = live
            while True:
                self._refresh(narrate)
                self._drive()
                self._check_children()
                live.update(self._progress(), refresh=True)
                if all(t.final and t.step == "done" for t in self.tracks):
                    break
                if time.monotonic() > deadline:
                    self.say(f"[red]timed out[/] after {self.timeout:.0f} s")
                    break
                time.sleep(TICK_SECONDS)
        self.live = None
        return self._refresh_details()

    def _refresh(self, narrate: bool) -> None:
        from worker.client import get_job_detail, list_jobs

        views = {v.id: v for v in list_jobs(limit=1000)}
        for track in self.tracks:
            if track.job_id is None or track.job_id not in views:
                continue
            before = track.status
            track.view = views[track.job_id]
            if track.scenario.settle is not None:
                track.detail = get_job_detail(track.job_id)
            if narrate and track.status != before:
                self.say(
                    f"#{track.scenario.number} {track.scenario.gateway}: {_styled(track.status)}"
                )
            if track.scenario.settle is None and track.final:
                track.step = "done"

    def _check_children(self) -> None:
        for child in self.children.started:
            if not child.alive() and not child.stopped_on_purpose:
                raise DemoError(f"{child.name} exited (code {child.popen.returncode})")

    def _drive(self) -> None:
        for track in self.tracks:
            if track.scenario.settle == "by_poll":
                self._drive_by_poll(track)
            elif track.scenario.settle == "by_callback":
                self._drive_by_callback(track)

    def _drive_by_poll(self, track: Track) -> None:
        """vaultspay reviews refunds by hand; here the demo is its finance team. It moves the
        request 0 → 1 → 2 after refundq's polls have seen each status. Before the 2, it takes
        refundq's webhook down: vaultspay's callback is lost (the sandbox sends it once, and
        vaultspay documents no resend), and refundq's next poll settles the job anyway."""
        admin = self.admin
        assert admin is not None
        n = track.scenario.number
        uuid = str(track.view.provider_reference or "") if track.view is not None else ""
        if track.step == "start" and track.status == "awaiting_gateway" and uuid:
            track.step = "first poll"
            track.note = f"{uuid}: 0 (pending)"
            self.say(f"#{n} vaultspay accepted the refund as {uuid} (0, pending); refundq polls it")
        elif track.step == "first poll" and track.polls_done() >= 1:
            admin.set_vaultspay_status(uuid, 1)
            track.step = "poll at 1"
            track.note = f"{uuid}: moved to 1 (initiated)"
            self.say(f"#{n} a poll saw 0; demo moves {uuid} to 1 (initiated)")
        elif track.step == "poll at 1" and str(track.view.raw_status or "").startswith("1"):
            if any(t.scenario.settle == "by_callback" and t.step != "done" for t in self.tracks):
                return  # the webhook stays up until the callback scenario has its callback
            api = self.children.get("api")
            assert api is not None
            self.children.stop(api)
            admin.set_vaultspay_status(uuid, 2)
            track.step = "callback lost"
            track.note = f"{uuid}: moved to 2 (processed); webhook down"
            self.say(
                f"#{n} a poll saw 1; demo stops refundq's webhook, then moves {uuid} to "
                "2 (processed): vaultspay calls back into the void"
            )
        elif track.step == "callback lost" and admin.callbacks(uuid):
            call = admin.callbacks(uuid)[-1]
            why = call.get("error") or f"HTTP {call.get('http_status')}"
            track.step = "done"
            track.note = "callback lost; the next poll settles it"
            self.say(
                f"#{n} the callback for {uuid} was lost ({escape(str(why))}); only a poll can "
                "settle this job now"
            )
        elif track.step != "done" and track.final:
            track.step = "done"  # not as planned; the report says what happened

    def _drive_by_callback(self, track: Track) -> None:
        """Moved to 2 as soon as vaultspay accepted it, long before refundq's first scheduled
        poll (2 s): vaultspay's callback reaches refundq's webhook and settles it."""
        admin = self.admin
        assert admin is not None
        n = track.scenario.number
        if track.step == "start" and track.status == "awaiting_gateway":
            uuid = track.view.provider_reference
            admin.set_vaultspay_status(uuid, 2)
            track.step = "callback"
            track.note = f"{uuid}: moved to 2 (processed)"
            self.say(f"#{n} vaultspay accepted {uuid}; demo moves it to 2 (processed) at once")
        elif track.step == "callback" and track.detail is not None:
            if any(e.kind == "callback" for e in track.detail.events):
                track.step = "done"
                track.note = "callback received, confirmed by a status call"
                self.say(
                    f"#{n} refundq's webhook received vaultspay's callback; callbacks are not "
                    "signed, so refundq confirms it with a status call before settling"
                )
            elif track.final:
                track.step = "done"
        elif track.step != "done" and track.final:
            track.step = "done"

    def _progress(self) -> Table:
        table = Table(title=f"jobs ({self.elapsed():.1f} s)", title_justify="left")
        for column in ("#", "gateway", "scenario", "status", "tries", "now"):
            table.add_column(column, no_wrap=column != "now")
        for track in self.tracks:
            view = track.view
            now = track.note
            if view is not None and track.final:
                now = _gateway_answer(view)
            elif view is not None and view.status == "awaiting_gateway":
                now = f"{track.note}; gateway says {view.raw_status or '0'}"
            table.add_row(
                str(track.scenario.number),
                track.scenario.gateway,
                _scenario_text(track.scenario),
                _styled(track.status) if view is not None else "[dim]not yet enqueued[/]",
                str(view.attempts) if view is not None else "",
                escape(now),
            )
        return table

    # --- the verdict -------------------------------------------------------------------------

    def _refresh_details(self) -> bool:
        from worker.client import get_job_detail

        for track in self.tracks:
            if track.job_id is not None:
                track.detail = get_job_detail(track.job_id)
                track.view = track.detail
        return all(t.final for t in self.tracks)

    def _report(self, all_final: bool) -> bool:
        admin = self.admin
        assert admin is not None
        applied: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for entry in admin.ledger():
            applied.setdefault((entry["gateway"], entry["payment_ref"]), []).append(entry)
        table = Table(title="final states", title_justify="left")
        columns = ("#", "job", "gateway", "scenario", "expected", "actual", "tries",
                   "gateway ledger", "gateway ref / gateway's answer")  # fmt: skip
        for column in columns:
            table.add_column(column, no_wrap=column in ("#", "job", "gateway", "tries"))
        matching: list[Scenario] = []
        for track in self.tracks:
            scenario = track.scenario
            entries = applied.get((scenario.gateway, track.payment_ref), [])
            actual, ok = _judge(track, len(entries))
            if ok:
                matching.append(scenario)
            table.add_row(
                str(scenario.number),
                (track.job_id or "-")[:8],
                scenario.gateway,
                _scenario_text(scenario),
                scenario.expected.label(),
                ("[green]✓[/] " if ok else "[bold red]✗[/] ") + actual,
                str(track.view.attempts) if track.view is not None else "-",
                _ledger_text(entries),
                escape(_gateway_answer(track.view)) if track.view is not None else "-",
            )
        self.console.print(table)
        # Why the interesting ones ended as they did (only where they did end so).
        for scenario in matching:
            if scenario.explain:
                self.console.print(
                    f"[dim]#{scenario.number}[/] {escape(scenario.explain)}", highlight=False
                )
        total = len(self.tracks)
        matched = len(matching)
        ok = matched == total and all_final
        if ok:
            self.console.print(
                f"[bold green]✓ all {total} jobs reached their expected state[/]; the gateways' "
                "ledgers show every refund or cancel applied as expected, none twice "
                f"({self.elapsed():.1f} s)",
                highlight=False,
            )
        else:
            self.console.print(
                f"[bold red]✗ {total - matched} of {total} jobs did not reach their expected "
                f"state[/] ({self.elapsed():.1f} s)",
                highlight=False,
            )
        return ok

    def _print_logs(self) -> None:
        for child in self.children.started:
            self.console.rule(f"{child.name}: last {LOG_TAIL_LINES} lines of {child.log_path}")
            self.console.print(Text(child.tail() or "(empty)"), soft_wrap=True)

    def _print_kept(self) -> None:
        self.console.print(
            Group(
                Text(f"kept {self.workdir} (database, logs, keys). To look inside:"),
                Text(
                    f"  REFUNDQ_DATABASE_URL=sqlite:///{self.workdir / 'refundq.db'} refundq list",
                    style="bold",
                ),
            ),
            soft_wrap=True,
        )


# ---- judging -------------------------------------------------------------------------------------


def _judge(track: Track, applied: int) -> tuple[str, bool]:
    """The actual outcome in words, and whether it is what the scenario expects."""
    expected = track.scenario.expected
    view = track.view
    if view is None:
        return "never enqueued", False
    parts = [_styled(view.status)]
    ok = view.status == expected.status and applied == expected.applied
    if expected.code is not None:
        code = view.last_error.code if view.last_error else None
        parts.append(str(code or "no code"))
        ok = ok and code == expected.code
    if expected.via is not None:
        via = settled_by(track.detail)
        polls = track.polls_done()
        parts.append(f"by {via} ({polls} status {'call' if polls == 1 else 'calls'})")
        ok = ok and via == expected.via
    if expected.attempts is not None:
        parts.append(f"after {_tries(view.attempts)}")
        ok = ok and view.attempts == expected.attempts
    return " ".join(parts), ok


def settled_by(detail: Any) -> str:
    """How a vaultspay job learnt its final answer. "callback": a callback was received before
    any status poll was made (the poll it triggered confirmed it); "poll": no callback was received
    before it settled; otherwise "both" (a scheduled poll and a callback raced)."""
    if detail is None or detail.status not in FINAL:
        return "nothing yet"
    settled_at = max(
        (_time(e.at) for e in detail.events if e.to_status == detail.status), default=None
    )
    callbacks = [
        _time(e.at)
        for e in detail.events
        if e.kind == "callback" and settled_at is not None and _time(e.at) <= settled_at
    ]
    polls = [_time(a.started_at) for a in detail.attempt_log if a.purpose == "poll"]
    if not callbacks:
        return "poll" if polls else "send"
    if all(p >= min(callbacks) for p in polls):
        return "callback"
    return "both"


def _time(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)


def _tries(count: int) -> str:
    return f"{count} {'try' if count == 1 else 'tries'}"


def _scenario_text(scenario: Scenario) -> str:
    if scenario.kind == "cancel":
        return scenario.title
    amount = scenario.amount or ""
    of = f" of {scenario.payment_amount}" if scenario.amount != scenario.payment_amount else ""
    return f"{scenario.title}: {amount}{of} {scenario.currency}"


def _gateway_answer(view: Any) -> str:
    if view.status == "succeeded":
        return str(view.provider_reference or view.raw_status or "accepted")
    if view.last_error is not None:
        return f"{view.last_error.code}: {view.last_error.message}"
    return str(view.provider_reference or "")


def _ledger_text(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "nothing"
    kinds = [f"{e['kind']} {e['amount']}" if e["kind"] == "refund" else e["kind"] for e in entries]
    return ", ".join(kinds)


def _styled(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


# ---- process state -------------------------------------------------------------------------------


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated


def _restore_env(saved: Mapping[str, str]) -> None:
    for name in [k for k in os.environ if k.startswith("REFUNDQ_")]:
        del os.environ[name]
    os.environ.update(saved)
    with contextlib.suppress(Exception):  # the process is about to exit anyway
        _reset_process_state()


def _reset_process_state() -> None:
    """Forget settings, engines, HTTP clients and the broker connection this process built, so
    that it works against the environment as it is now."""
    from worker import db, gateways
    from worker.app import configure
    from worker.settings import get_settings

    get_settings.cache_clear()
    db.dispose_all()
    gateways.reset()
    configure()


def run_demo(*, keep: bool = False, verbose: bool = False, timeout: float = 45.0) -> int:
    """Run the demo; returns the exit code (0 only if every job ended as expected)."""
    # Off a terminal rich would assume 80 columns; widen it unless COLUMNS says otherwise.
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    console = Console(width=None if wide else 200, highlight=False)
    return Demo(console, keep=keep, verbose=verbose, timeout=timeout).run()


__all__ = ["Expected", "Scenario", "find_broker", "run_demo", "scenarios", "settled_by"]
