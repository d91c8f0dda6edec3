"""What the operations tests share: the Procfile and docker-compose.yml as data, running a
Procfile process in a test stack, and capturing what crosses the broker and the gateway wire."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import shlex
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.polling import wait_for
from tests.support.stack import REPO, Process, Stack

PROCFILE = REPO / "Procfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
FLOWER_CONFIG = REPO / "flowerconfig.py"
PROCESSES = ["web", "worker", "beat", "flower", "sandbox"]

# How Heroku, honcho and foreman read a Procfile: `name: command`, one a line; anything else
# (comments, blank lines) is ignored.
_PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s?(.*)$")


def procfile_processes(path: Path = PROCFILE) -> dict[str, str]:
    processes: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = _PROCFILE_LINE.match(line)
        if match:
            name, command = match.groups()
            assert name not in processes, f"Procfile names {name!r} twice"
            processes[name] = command.strip()
    return processes


def compose_file(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return document


# ---- running the Procfile's own commands in a test stack ------------------------------------


def tool_dir(directory: Path) -> Path:
    """A directory for PATH with the console scripts the Procfile calls (`celery`, `uvicorn`,
    `refundq`, `honcho`) for this interpreter. pyproject.toml maps `refundq` to
    `worker.cli:main`; where the environment has no such script (refundq not pip-installed), a
    two-line shim runs the same function."""
    directory.mkdir(parents=True, exist_ok=True)
    venv_bin = Path(sys.executable).parent
    for name in ("celery", "uvicorn", "honcho", "refundq"):
        target = directory / name
        if target.exists():
            continue
        if (venv_bin / name).exists():
            target.symlink_to(venv_bin / name)
        elif name == "refundq":
            entry = "import sys; from worker.cli import main; sys.argv[0] = 'refundq'; main()"
            target.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{entry}" "$@"\n')
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def process_env(stack: Stack, **overrides: str) -> dict[str, str]:
    """The stack's environment for a Procfile command: its settings, plus PATH with the tools."""
    path = f"{tool_dir(stack.workdir / 'bin')}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return stack.child_env(PATH=path, **overrides)


def prepare_app_root(directory: Path) -> Path:
    """A directory to run the Procfile in, as a checkout would be: the Procfile's relative paths
    (flowerconfig.py, the sandbox's keys) resolve there, not in the repo."""
    link = directory / "flowerconfig.py"
    if not link.exists():
        link.symlink_to(FLOWER_CONFIG)
    return directory


def start_procfile_process(stack: Stack, name: str, **env: str) -> Process:
    """Run the Procfile's `name` command verbatim (through `sh -c`, as a Procfile runner does) in
    the stack's work directory, with the stack's environment; the harness kills it."""
    prepare_app_root(stack.workdir)
    command = procfile_processes()[name]
    return stack.spawn(name, ["/bin/sh", "-c", command], process_env(stack, **env))


def wait_worker_ready(process: Process, timeout: float = 60) -> None:
    wait_for(
        lambda: "ready." in process.log() or not process.alive(),
        timeout=timeout,
        message=lambda: f"{process.name} to be ready:\n{process.log()[-3000:]}",
    )
    assert process.alive(), f"{process.name} died at start:\n{process.log()[-3000:]}"


def wait_beat_started(process: Process, timeout: float = 30) -> None:
    wait_for(
        lambda: "beat: Starting" in process.log() or not process.alive(),
        timeout=timeout,
        message=lambda: f"{process.name} to start:\n{process.log()[-3000:]}",
    )
    assert process.alive(), f"{process.name} died at start:\n{process.log()[-3000:]}"


def wait_http_ok(
    url: str, process: Process | None = None, timeout: float = 45, **request: Any
) -> httpx.Response:
    last: dict[str, Any] = {}

    def probe() -> httpx.Response | None:
        if process is not None and not process.alive():
            raise AssertionError(f"{process.name} exited:\n{process.log()[-3000:]}")
        try:
            response = httpx.get(url, timeout=2, **request)
        except httpx.HTTPError as exc:
            last["error"] = repr(exc)
            return None
        last["error"] = f"HTTP {response.status_code}: {response.text[:300]}"
        return response if response.status_code == 200 else None

    return wait_for(
        probe,
        timeout=timeout,
        interval=0.2,
        message=lambda: (
            f"{url} to answer 200 (last: {last.get('error')})"
            + (f"\n{process.log()[-3000:]}" if process is not None else "")
        ),
    )


# ---- log lines -------------------------------------------------------------------------------

# Celery warns on stderr, before any logging is configured, when a worker runs as root (the test
# machine; the Docker image runs as an unprivileged user): the `warnings` module's own format.
_ROOT_WARNING = re.compile(
    r"^\S+: SecurityWarning: You're running the worker with superuser privileges.*?"
    r"^  _warn_or_raise_security_error\([^\n]*\n",
    re.MULTILINE | re.DOTALL,
)


def log_events(text: str, *, allow: Iterable[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON events of a process log, and the lines that are not one JSON object each.
    `allow`: regexes of lines a test tolerates (a CLI's human output)."""
    if os.geteuid() == 0:
        text = _ROOT_WARNING.sub("", text)
    allowed = [re.compile(pattern) for pattern in allow]
    events: list[dict[str, Any]] = []
    strays: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and "event" in event:
            events.append(event)
        elif not any(pattern.search(line) for pattern in allowed):
            strays.append(line)
    return events, strays


# ---- the broker: every command (Redis MONITOR) and what is left in it -----------------------


def _monitor_args(line: str) -> list[bytes]:
    """The arguments of one MONITOR line (`<time> [<db> <addr>] "CMD" "arg" ...`), unescaped
    (Redis quotes them with sdscatrepr: \\" \\\\ \\n \\r \\t \\a \\b and \\xHH)."""
    escapes = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", '"': b'"', "\\": b"\\"}
    args: list[bytes] = []
    start = line.find("] ")
    index = start + 2 if start >= 0 else 0
    while index < len(line):
        if line[index] != '"':
            index += 1
            continue
        index += 1
        value = bytearray()
        while index < len(line) and line[index] != '"':
            char = line[index]
            if char == "\\" and index + 1 < len(line):
                follower = line[index + 1]
                if follower == "x":
                    value.append(int(line[index + 2 : index + 4], 16))
                    index += 4
                    continue
                value += escapes.get(follower, follower.encode("latin-1"))
                index += 2
                continue
            value += char.encode("latin-1")
            index += 1
        args.append(bytes(value))
        index += 1
    return args


@dataclass
class BrokerMonitor:
    """A `MONITOR` connection to a Redis server: every command any client sends, with its
    payload, from `start()` to `stop()`. A raw socket, because a client library's read timeout
    would drop the connection (and with it the MONITOR)."""

    port: int
    lines: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "MONITOR did not start"

    def _run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
            connection.sendall(b"MONITOR\r\n")
            connection.settimeout(0.2)
            buffer = b""
            while True:
                try:
                    chunk = connection.recv(1 << 16)
                except TimeoutError:
                    if self._stop.is_set():
                        return
                    continue
                if not chunk:
                    return
                buffer += chunk
                *complete, buffer = buffer.split(b"\r\n")
                for raw in complete:
                    text = raw.decode("latin-1")
                    if text == "+OK":
                        self._ready.set()
                    elif text.startswith("+"):
                        self.lines.append(text[1:])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def payloads(self) -> Iterator[bytes]:
        """Every argument of every command seen."""
        for line in self.lines:
            yield from _monitor_args(line)


def redis_contents(client: Any) -> Iterator[bytes]:
    """Every key and value left in a Redis database, whatever its type."""
    for key in client.scan_iter(count=1000):
        yield key
        kind = client.type(key).decode()
        if kind == "string":
            yield client.get(key) or b""
        elif kind == "list":
            yield from client.lrange(key, 0, -1)
        elif kind == "set":
            yield from client.smembers(key)
        elif kind == "zset":
            yield from client.zrange(key, 0, -1)
        elif kind == "hash":
            for name, value in client.hgetall(key).items():
                yield name
                yield value


def readable(payloads: Iterable[bytes]) -> list[str]:
    """Payloads as text, plus every kombu message body inside them decoded: Celery's messages
    (task calls and events) carry their body base64-encoded in a JSON envelope, so a secret in a
    body would not show in the raw bytes."""
    texts: list[str] = []
    for payload in payloads:
        text = payload.decode("utf-8", errors="replace")
        texts.append(text)
        try:
            document = json.loads(text)
        except ValueError:
            continue
        texts.extend(_decoded_bodies(document))
    return texts


def _decoded_bodies(document: Any) -> Iterator[str]:
    if isinstance(document, dict):
        properties = document.get("properties")
        body = document.get("body")
        if (
            isinstance(properties, dict)
            and properties.get("body_encoding") == "base64"
            and isinstance(body, str)
        ):
            with contextlib.suppress(binascii.Error, ValueError):
                yield base64.b64decode(body).decode("utf-8", errors="replace")
        for value in document.values():
            yield from _decoded_bodies(value)
    elif isinstance(document, list):
        for value in document:
            yield from _decoded_bodies(value)


# ---- the gateway wire: what the worker sent and the gateways answered ------------------------


@dataclass
class Exchange:
    path: str
    request_headers: dict[str, str]
    request_body: bytearray = field(default_factory=bytearray)
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytearray = field(default_factory=bytearray)


class WireRecorder:
    """ASGI middleware around the sandbox that records every gateway request and response
    (never `/_admin`), passing every message through untouched — faults that cut a response
    short still do."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_admin"):
            await self.app(scope, receive, send)
            return
        exchange = Exchange(
            path=scope["path"],
            request_headers=_headers(scope["headers"]),
        )
        self.exchanges.append(exchange)

        async def recorded_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                exchange.request_body += message.get("body", b"")
            return message

        async def recorded_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                exchange.response_headers = _headers(message.get("headers", []))
            elif message["type"] == "http.response.body":
                exchange.response_body += message.get("body", b"")
            await send(message)

        await self.app(scope, recorded_receive, recorded_send)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}


_SIGN = re.compile(r"sign=([0-9A-Fa-f]+)")


def credentials_on_the_wire(exchanges: Iterable[Exchange]) -> dict[str, set[str]]:
    """The credential-like values that crossed the gateway wire, by kind: bearer tokens the
    gateway issued, V2_SHA256 `sign=` values (both ways), bbmsl request signatures, API keys
    sent as headers, and the HMAC of every callback URL handed to a gateway."""
    found: dict[str, set[str]] = {
        "bearer token": set(),
        "pgv2 sign": set(),
        "bbmsl signature": set(),
        "api key header": set(),
        "callback token": set(),
    }
    for exchange in exchanges:
        for headers in (exchange.request_headers, exchange.response_headers):
            authorization = headers.get("authorization", "")
            if authorization.lower().startswith("bearer "):
                found["bearer token"].add(authorization.split(" ", 1)[1].strip())
            found["pgv2 sign"].update(_SIGN.findall(authorization))
        if exchange.request_headers.get("x-api-key"):
            found["api key header"].add(exchange.request_headers["x-api-key"])
        bodies = ((exchange.request_body, "request"), (exchange.response_body, "response"))
        for body, direction in bodies:
            try:
                document = json.loads(bytes(body))
            except ValueError:
                continue
            for key, value in _walk(document):
                if key == "signature" and direction == "request":
                    found["bbmsl signature"].add(value)
                elif key == "access_token":
                    found["bearer token"].add(value)
                elif key == "callbackHookUrl" and "." in value:
                    found["callback token"].add(value.rsplit(".", 1)[1])
    return {kind: {v for v in values if len(v) >= 8} for kind, values in found.items()}


def _walk(document: Any) -> Iterator[tuple[str, str]]:
    if isinstance(document, dict):
        for key, value in document.items():
            if isinstance(value, str):
                yield str(key), value
            yield from _walk(value)
    elif isinstance(document, list):
        for value in document:
            yield from _walk(value)


def leaks(secrets: dict[str, set[str]], haystacks: dict[str, Iterable[str]]) -> list[str]:
    """Where each secret shows up: `"<kind> in <haystack>: ...context..."` per finding."""
    findings: list[str] = []
    for where, texts in haystacks.items():
        for text in texts:
            for kind, values in secrets.items():
                for value in values:
                    at = text.find(value)
                    if at >= 0:
                        context = text[max(0, at - 80) : at + len(value) + 40]
                        findings.append(f"{kind} in {where}: ...{context}...")
    return findings


def shell_words(command: str) -> list[str]:
    return shlex.split(command)
