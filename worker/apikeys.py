"""API keys for the HTTP API: made by `refundq apikey create NAME`, stored only as salted hashes.

A key reads `rq_<key id>_<secret>`. The key id is public (it finds the stored line and shows in
logs); the secret is 40 random characters from `secrets` (about 238 bits). What is stored is one
line per key, `name:key_id:salt:hash`, in `REFUNDQ_API_KEYS` (lines separated by newlines or
commas) or in the file `REFUNDQ_API_KEYS_FILE` (default `./refundq-api-keys`), which is re-read
whenever it changes: a new key works, and a deleted line stops working, without a restart.

The hash is HMAC-SHA256 keyed with a per-key random salt. A fast hash is right here: slow
password hashes (bcrypt, scrypt, argon2) exist because passwords are guessable, and make each
guess expensive. A 238-bit random secret cannot be guessed however fast each guess is, so a
slow hash would only cost every API request tens of milliseconds. The salt keeps two stored
lines from ever being compared with each other or with a precomputed table.

The NAME is who the key belongs to (a shop's back end). Idempotency keys sent over HTTP are
scoped by it, so several keys of one name (a rotation: create the new key, deploy it, delete the
old line) share one idempotency scope, and two shops never collide.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import string
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from worker.errors import InvalidRequest
from worker.logs import get_logger
from worker.settings import Settings, get_settings

log = get_logger("refundq.apikeys")

PREFIX = "rq"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")
MAX_NAME = 48
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_SECRET_ALPHABET = string.ascii_letters + string.digits
_SECRET_LENGTH = 40
_SALT_BYTES = 16


@dataclass(frozen=True)
class ApiKey:
    """Who a request comes from: the key's name and its (public) id. Never the key itself."""

    name: str
    key_id: str


@dataclass(frozen=True)
class StoredKey:
    """One stored line: what it takes to recognise a key, and nothing to rebuild it from."""

    name: str
    key_id: str
    salt: bytes
    digest: bytes

    def line(self) -> str:
        return f"{self.name}:{self.key_id}:{self.salt.hex()}:{self.digest.hex()}"

    def matches(self, presented: str) -> bool:
        return hmac.compare_digest(_hash(presented, self.salt), self.digest)


def _hash(presented: str, salt: bytes) -> bytes:
    return hmac.new(salt, presented.encode("utf-8"), hashlib.sha256).digest()


def check_name(name: str) -> str:
    """A key name: letters, digits, `_`, `.`, `-` (it ends up in idempotency keys and logs)."""
    if not NAME.fullmatch(name):
        raise InvalidRequest(
            "name",
            f"{name!r} is not a key name: use up to {MAX_NAME} letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
        )
    return name


def new_key(name: str) -> tuple[str, StoredKey]:
    """A fresh key for `name`: (the key, to show once; its stored line)."""
    check_name(name)
    key_id = secrets.token_hex(6)
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))
    key = f"{PREFIX}_{key_id}_{secret}"
    salt = secrets.token_bytes(_SALT_BYTES)
    return key, StoredKey(name=name, key_id=key_id, salt=salt, digest=_hash(key, salt))


def append_key(path: Path, stored: StoredKey) -> None:
    """Add `stored` to the keys file at `path` (created 0600 if missing; one line, appended)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as existing:
            existing.seek(-1, os.SEEK_END)
            needs_newline = existing.read(1) != b"\n"
    line = ("\n" if needs_newline else "") + stored.line() + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as keys_file:
        keys_file.write(line)


def parse_lines(text: str, source: str) -> list[StoredKey]:
    """Stored lines from `text` (newline or comma separated; blank lines and `#` comments are
    skipped). A malformed line is skipped with a warning naming where it is."""
    keys: list[StoredKey] = []
    for number, raw in enumerate(re.split(r"[\n,]", text), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        try:
            if len(parts) != 4:
                raise ValueError("expected name:key_id:salt:hash")
            name, key_id, salt, digest = parts
            check_name(name)
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError("the key id is not 12 hex digits")
            stored = StoredKey(name, key_id, bytes.fromhex(salt), bytes.fromhex(digest))
            if len(stored.digest) != hashlib.sha256().digest_size or not stored.salt:
                raise ValueError("the salt or the hash has the wrong length")
        except (ValueError, InvalidRequest) as exc:
            log.warning("apikeys.bad_line", source=source, entry=number, error=str(exc))
            continue
        keys.append(stored)
    return keys


class KeyRing:
    """The configured keys, parsed once and parsed again when the keys file changes (one
    `stat` per request). Thread-safe: the API serves requests from a thread pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signature: object = None
        self._by_id: dict[str, list[StoredKey]] = {}

    def keys(self, settings: Settings | None = None) -> dict[str, list[StoredKey]]:
        settings = settings or get_settings()
        path = settings.api_keys_file
        try:
            status = path.stat()
            file_signature: object = (status.st_mtime_ns, status.st_size, status.st_ino)
        except FileNotFoundError:
            file_signature = None
        signature = (settings.api_key_hashes, str(path), file_signature)
        with self._lock:
            if signature != self._signature:
                self._by_id = _index(_load(settings, file_signature is not None))
                self._signature = signature
                log.info("apikeys.loaded", keys=sum(len(v) for v in self._by_id.values()))
            return self._by_id

    def verify(self, presented: str) -> ApiKey | None:
        """The key's owner, or None. Compares hashes in constant time; an unknown key id costs
        the same hash and comparison as a known one."""
        parts = presented.split("_", 2)
        key_id = parts[1] if len(parts) == 3 and parts[0] == PREFIX else ""
        candidates = self.keys().get(key_id, [])
        found: ApiKey | None = None
        for stored in candidates or [_DECOY]:
            if stored.matches(presented) and stored is not _DECOY:
                found = ApiKey(stored.name, stored.key_id)
        return found

    def configured(self) -> bool:
        return bool(self.keys())


_DECOY = StoredKey("decoy", "0" * 12, b"\0" * _SALT_BYTES, b"\0" * 32)


def _load(settings: Settings, file_exists: bool) -> list[StoredKey]:
    keys = parse_lines(settings.api_key_hashes or "", "REFUNDQ_API_KEYS")
    if file_exists:
        try:
            text = settings.api_keys_file.read_text(encoding="utf-8")
        except OSError as exc:
            log.error("apikeys.unreadable", path=str(settings.api_keys_file), error=exc.strerror)
        else:
            keys += parse_lines(text, str(settings.api_keys_file))
    return keys


def _index(keys: Iterable[StoredKey]) -> dict[str, list[StoredKey]]:
    by_id: dict[str, list[StoredKey]] = {}
    for stored in keys:
        by_id.setdefault(stored.key_id, []).append(stored)
    return by_id


keyring = KeyRing()
