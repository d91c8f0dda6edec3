"""Celery's per-task INFO lines are left out below DEBUG and come back at DEBUG, also when the
level changes within one process (worker/logs.py). In a child process: configuring logging
replaces the root logger's handlers, which pytest's own capture relies on."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
from worker.logs import CELERY_PER_TASK_LOGGERS, configure_logging

def enabled(level):
    return [logging.getLogger(n).isEnabledFor(level) for n in CELERY_PER_TASK_LOGGERS]

configure_logging("INFO")
print(enabled(logging.INFO), enabled(logging.WARNING))
configure_logging("DEBUG")
print(enabled(logging.INFO))
"""


def test_per_task_lines_follow_the_configured_level():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == ["[False, False] [True, True]", "[True, True]"]
