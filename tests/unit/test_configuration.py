"""Settings, the Celery configuration refundq relies on, and the layout rules (STYLE.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import providers
from providers.config import SettingsFileError
from worker.app import VISIBILITY_TIMEOUT_SECONDS, celery_config
from worker.schedule import beat_schedule
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("REFUNDQ_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_work_on_a_fresh_machine():
    settings = Settings()
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.database_url == "sqlite:///refundq.db"


def test_a_secret_can_come_from_a_file_and_never_prints(monkeypatch, tmp_path):
    (tmp_path / "secret").write_text("s3cr3t-webhook\n")
    monkeypatch.setenv("REFUNDQ_WEBHOOK_SECRET_FILE", str(tmp_path / "secret"))
    settings = Settings()
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == "s3cr3t-webhook"
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in str(settings)


def test_settings_come_from_a_dotenv_file_too(tmp_path):
    (tmp_path / ".env").write_text("REFUNDQ_BROKER_URL=redis://elsewhere:6379/3\n")
    assert Settings().broker_url == "redis://elsewhere:6379/3"


def test_an_unreadable_secret_file_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("REFUNDQ_WEBHOOK_SECRET_FILE", "/nonexistent/secret")
    with pytest.raises(SettingsFileError, match="REFUNDQ_WEBHOOK_SECRET_FILE names"):
        Settings()


def test_the_task_time_limit_must_stay_inside_the_lease(monkeypatch):
    monkeypatch.setenv("REFUNDQ_LEASE_SECONDS", "60")
    monkeypatch.setenv("REFUNDQ_TASK_TIME_LIMIT_SECONDS", "60")
    with pytest.raises(ValidationError, match="must be below REFUNDQ_LEASE_SECONDS"):
        Settings()


def test_celery_is_configured_for_at_least_once_delivery_with_database_claims():
    conf = celery_config(Settings())
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_send_task_events"] is True and conf["task_send_sent_event"] is True
    assert conf["task_serializer"] == "json" and conf["accept_content"] == ["json"]
    # The visibility timeout is set in all three places Celery reads it (celery/celery#7651)
    # and exceeds every countdown refundq hands to Celery plus the task time limit.
    assert conf["broker_transport_options"]["visibility_timeout"] == VISIBILITY_TIMEOUT_SECONDS
    assert conf["result_backend_transport_options"]["visibility_timeout"] == (
        VISIBILITY_TIMEOUT_SECONDS
    )
    assert conf["visibility_timeout"] == VISIBILITY_TIMEOUT_SECONDS
    settings = Settings()
    assert (
        settings.max_countdown_seconds + settings.task_time_limit_seconds
    ) < VISIBILITY_TIMEOUT_SECONDS
    assert conf["task_time_limit"] < settings.lease_seconds


def test_every_beat_entry_expires_within_its_interval_and_names_a_registered_task():
    import tasks  # noqa: F401  (registers the tasks)
    from worker.app import app

    schedule = beat_schedule(Settings())
    assert {e["task"] for e in schedule.values()} >= {
        "refundq.dispatch_queued",
        "refundq.reap_expired",
        "refundq.poll_pending",
        "refundq.reconcile",
    }
    for entry in schedule.values():
        assert 0 < entry["options"]["expires"] <= entry["schedule"]
        assert entry["task"] in app.tasks


def test_task_names_are_readable_and_take_only_a_job_id():
    import inspect

    import tasks
    from worker.app import app

    refundq_tasks = {name: t for name, t in app.tasks.items() if name.startswith("refundq.")}
    assert {"refundq.execute_job", "refundq.dispatch_queued", "refundq.reap_expired"} <= set(
        refundq_tasks
    )
    for name, task in refundq_tasks.items():
        params = list(inspect.signature(task.run).parameters)
        assert params in ([], ["job_id"]), (name, params)
    assert tasks.execute_job.acks_late is True


def test_no_provider_name_appears_in_the_engine_or_the_tasks():
    """Rule 5 is applied from capabilities: adding a gateway touches nothing in worker/'s
    engine or tasks/ (STYLE.md 2)."""
    names = providers.provider_ids()
    for path in [
        REPO / "worker" / "jobs.py",
        REPO / "worker" / "engine.py",
        REPO / "worker" / "reconcile.py",
        REPO / "worker" / "callbacks.py",
        *sorted((REPO / "tasks").glob("*.py")),
    ]:
        text = path.read_text()
        for name in names:
            assert not re.search(rf"\b{name}\b", text), f"{name} named in {path.name}"


def test_the_runtime_never_loads_the_simulators():
    code = (
        "import sys, worker.app, tasks, worker.api, worker.client, worker.engine\n"
        "loaded = sorted(m for m in sys.modules if m == 'sandbox' or m.startswith('sandbox.'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_a_callback_token_with_any_characters_is_simply_not_ours(monkeypatch):
    from worker import gateways
    from worker.settings import get_settings

    monkeypatch.setenv("REFUNDQ_WEBHOOK_SECRET", "s")
    get_settings.cache_clear()
    try:
        good = gateways.callback_token("abc")
        assert gateways.job_from_callback_token(good) == "abc"
        for hostile in ["abc.\x80", "abc.😀", "\x00", "abc." + "é" * 32, ".", ""]:
            assert gateways.job_from_callback_token(hostile) is None
    finally:
        get_settings.cache_clear()


def test_sql_is_never_built_from_strings_at_run_time():
    """Every statement is SQLAlchemy expressions or a literal: no f-string, %-formatting or
    concatenation reaches text(), execute() or exec_driver_sql() in the runtime, so input can
    only ever travel as bound parameters (tests/property also round-trips SQL-ish text)."""
    import ast

    sinks = {"text", "execute", "exec_driver_sql", "executescript"}
    offenders = []
    for folder in ("worker", "tasks", "providers"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in sinks and isinstance(node.args[0], ast.JoinedStr | ast.BinOp):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
