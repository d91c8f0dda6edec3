"""Flower's settings for refundq: `celery -A worker.app flower --conf=flowerconfig.py`.

Flower (2.x) executes this file with tornado's `parse_config_file`: every module-level name that
matches a Flower option sets it, so private names start with `_` (a name such as `logging` would
silently set Flower's `--logging` option). Precedence is Flower's own: `FLOWER_*` environment
variables < this file < command-line flags. The file therefore wins over the environment for the
settings below that are about safety; a flag on the command line still wins over it, so the
Procfile and docker-compose.yml pass only `--address` and `--port`.

Why each setting (CELERY_NOTES.md section 4; docs/operations.md):
* `basic_auth` from `REFUNDQ_FLOWER_BASIC_AUTH` (`user:password`, several separated by commas).
  Flower is unauthenticated by default; without the variable this file refuses to start Flower.
  `/healthcheck` and `/metrics` stay open: Flower exempts them from authentication.
* `read_only`: the UI and the API refuse revoke, terminate, apply, send-task, rate limits and
  worker pool or shutdown commands with 403. Flower is a window; refunds are driven only through
  refundq's own paths, which record who did what (`refundq retry`/`resolve`).
* `max_tasks` bounded (Flower's default, 100000, caused memory spikes: mher/flower#1305).
* `persistent` off: its shelve file corrupts and grows (mher/flower#1398, #1403); the database is
  the audit log, not Flower.
* `purge_offline_workers`: a worker that stopped disappears from the dashboard after 10 minutes
  instead of lingering (mher/flower#1422).
* `address` 127.0.0.1 unless the command line says otherwise: Flower belongs behind a proxy or on
  a private network (the compose file binds it to 0.0.0.0 inside its container and publishes it on
  the host's loopback only).
* Flower's own log lines are refundq's JSON lines (`worker.logs`).
"""

import os as _os

from worker.logs import configure_logging as _configure_logging

_AUTH_VARIABLE = "REFUNDQ_FLOWER_BASIC_AUTH"


def _credentials(raw: str) -> list[str]:
    pairs = [pair.strip() for pair in raw.split(",") if pair.strip()]
    if not pairs:
        raise SystemExit(
            f"refusing to start Flower without authentication: set {_AUTH_VARIABLE}=user:password "
            "(several pairs separated by commas)"
        )
    for pair in pairs:
        user, sep, password = pair.partition(":")
        if not (user and sep and password):
            raise SystemExit(
                f"{_AUTH_VARIABLE} must be user:password (several separated by commas); one of "
                f"its {len(pairs)} entries is not"
            )
    return pairs


basic_auth = _credentials(_os.environ.get(_AUTH_VARIABLE, ""))
read_only = True
max_tasks = 10000
persistent = False
purge_offline_workers = 600
address = "127.0.0.1"

_configure_logging(_os.environ.get("REFUNDQ_LOG_LEVEL", "INFO"))
