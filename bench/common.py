"""What every benchmark shares: statistics, the machine's description, CPU and memory readings
from /proc, and the JSON result file."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench-results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# ---- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds."""
    return {
        "p50_ms": round(percentile(seconds, 50) * 1000, 1),
        "p95_ms": round(percentile(seconds, 95) * 1000, 1),
        "p99_ms": round(percentile(seconds, 99) * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1) if seconds else float("nan"),
    }


def median_and_spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min, max and the spread (max - min) / median of repeated runs."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "spread": 0.0}
    middle = statistics.median(values)
    return {
        "median": round(middle, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "spread": round((max(values) - min(values)) / middle, 3) if middle else 0.0,
        "runs": len(values),
    }


# ---- the machine -------------------------------------------------------------------------


def _command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict[str, Any]:
    """Cores, memory, kernel, CPU model and the versions of everything in the path."""
    cpu_model = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions: dict[str, str] = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    for name in (
        "celery",
        "kombu",
        "billiard",
        "redis",
        "SQLAlchemy",
        "sqlmodel",
        "psycopg",
        "httpx",
        "uvicorn",
        "fastapi",
        "pydantic",
        "structlog",
        "gevent",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["redis-server"] = (
        _command_output(["redis-server", "--version"]).split(" v=")[-1].split()[0]
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": cpu_model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "versions": versions,
        "loadavg_at_start": load_average(),
    }


def load_average() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def wait_for_quiet(threshold: float, timeout: float) -> float:
    """Wait (up to `timeout` s) until the 1-minute load average is below `threshold`."""
    deadline = time.monotonic() + timeout
    load = load_average()
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(5)
        load = load_average()
    return load


# ---- /proc readings --------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces.
    return text[text.rfind(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def process_tree(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    tree = tree if tree is not None else children_map()
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(tree.get(current, []))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of these processes (and of their children already reaped)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of stat (index 11-14 after the name).
        total += sum(int(v) for v in fields[11:15])
    return total / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    return cpu_seconds(process_tree(pid))


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0


def pids_named(prefix: str) -> list[int]:
    """Processes whose command name starts with `prefix` (PostgreSQL's backends)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as handle:
                if handle.read().startswith(prefix):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def procfile_worker() -> tuple[str, int]:
    """The pool and concurrency the Procfile's worker line uses (the benchmarks' default)."""
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.startswith("worker:"):
            words = line.split()
            return words[words.index("--pool") + 1], int(words[words.index("--concurrency") + 1])
    raise RuntimeError("no worker line in the Procfile")


# ---- results -------------------------------------------------------------------------------


def default_json_path(command: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return RESULTS_DIR / f"{command}-{stamp}.json"


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def save_result(json_arg: str | None, command: str, payload: dict[str, Any]) -> Path:
    """A command's result file: `--json` if given, else a stamped file under bench-results/;
    written, and its path printed."""
    path = write_json(Path(json_arg) if json_arg else default_json_path(command), payload)
    say(f"\nwritten to {path}")
    return path


def say(message: str) -> None:
    print(message, flush=True)


def python() -> str:
    return sys.executable
