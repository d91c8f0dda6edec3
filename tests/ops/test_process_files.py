"""The Procfile, docker-compose.yml and the Dockerfile, read as data: they name the same
processes, every command's module, app and options resolve against the code, and the compose
wiring matches the sandbox's settings. No Docker engine is needed (none runs here); where a
compose client is installed, `config` validates the file too."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ops.support import (
    COMPOSE_FILE,
    DOCKERFILE,
    FLOWER_CONFIG,
    PROCESSES,
    compose_file,
    procfile_processes,
    shell_words,
)
from tests.support.stack import REPO

# What each process must run: the program, and for Celery the subcommand.
EXPECTED = {
    "web": ("uvicorn", None),
    "worker": ("celery", "worker"),
    "beat": ("celery", "beat"),
    "flower": ("celery", "flower"),
    "sandbox": ("refundq", "sandbox"),
}
# Where an app must come from, and what it must be.
APP_TYPES = {
    "worker.app:app": "celery.app.base.Celery",
    "worker.api:app": "fastapi.applications.FastAPI",
}


@dataclass(frozen=True)
class Invocation:
    source: str  # "Procfile" or "docker-compose.yml"
    process: str
    words: tuple[str, ...]


def _expand(word: str) -> str:
    """Shell variables as a runner without them set would see them: `${X:-d}` is `d`."""
    word = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), word)
    return re.sub(r"\$\{?\w+\}?", "x", word)


def _simple_commands(command: str | list[str]) -> list[list[str]]:
    words = shell_words(command) if isinstance(command, str) else list(command)
    if len(words) == 3 and words[0] in ("sh", "/bin/sh", "bash") and words[1] == "-c":
        return _simple_commands(words[2])
    commands: list[list[str]] = [[]]
    for word in words:
        if word == "&&":
            commands.append([])
        elif word == "exec" and not commands[-1]:
            continue
        else:
            commands[-1].append(_expand(word))
    return [c for c in commands if c]


def invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for process, command in procfile_processes().items():
        for words in _simple_commands(command):
            found.append(Invocation("Procfile", process, tuple(words)))
    for process, service in compose_file()["services"].items():
        if "command" in service and (process in EXPECTED or process == "migrate"):
            for words in _simple_commands(service["command"]):
                found.append(Invocation("docker-compose.yml", process, tuple(words)))
    return found


def _celery_parts(words: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(app, subcommand) of a `celery [global options] <subcommand> ...` command line."""
    app = None
    index = 1
    while index < len(words):
        word = words[index]
        if word in ("-A", "--app"):
            app = words[index + 1]
            index += 2
        elif word.startswith("--app="):
            app = word.split("=", 1)[1]
            index += 1
        elif word.startswith("-"):
            index += 1  # a flag such as --quiet (celery's global options take no values here)
        else:
            return app, word
    return app, None


# ---- the files name the same processes -------------------------------------------------------


def test_procfile_and_compose_run_the_same_five_processes():
    assert list(procfile_processes()) == PROCESSES
    services = set(compose_file()["services"])
    assert set(PROCESSES) | {"redis", "postgres"} <= services
    # Besides them, only the one-shot migration.
    assert services - set(PROCESSES) - {"redis", "postgres"} == {"migrate"}


def test_each_process_runs_the_program_it_is_named_for():
    for invocation in invocations():
        if invocation.process == "migrate" or invocation.words[:2] in (
            ("rm", "-f"),
            ("refundq", "db"),
        ):
            continue  # the migration and the web/beat preludes: checked below
        program, subcommand = EXPECTED[invocation.process]
        assert invocation.words[0] == program, invocation
        if program == "celery":
            assert _celery_parts(invocation.words) == ("worker.app", subcommand), invocation
        elif program == "refundq":
            assert invocation.words[1] == subcommand, invocation


def test_the_schema_is_migrated_before_web_worker_and_beat():
    # Procfile: web runs `refundq db upgrade` before serving.
    (upgrade, serve) = _simple_commands(procfile_processes()["web"])
    assert upgrade == ["refundq", "db", "upgrade"]
    assert serve[0] == "uvicorn"
    # Compose: a one-shot `migrate` the others wait for.
    services = compose_file()["services"]
    assert _simple_commands(services["migrate"]["command"]) == [["refundq", "db", "upgrade"]]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker", "beat"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_beat_keeps_its_schedule_in_memory_and_is_given_no_schedule_file():
    from worker.app import app

    assert app.conf.beat_scheduler == "worker.beat:Scheduler"
    sources = {
        "Procfile": procfile_processes()["beat"],
        "docker-compose.yml": compose_file()["services"]["beat"]["command"],
    }
    for source, command in sources.items():
        (beat,) = _simple_commands(command)
        assert not {"--schedule", "-s", "--scheduler", "-S"} & set(beat), source


# ---- every command resolves ------------------------------------------------------------------


def _click_command(program: str) -> Any:
    """The click command behind a console script, as its entry point builds it."""
    if program == "celery":
        from celery.bin.celery import celery

        return celery
    if program == "uvicorn":
        from uvicorn.main import main

        return main
    if program == "refundq":
        import typer.main

        from worker.cli import app

        return typer.main.get_command(app)
    raise AssertionError(f"no console script {program!r} is expected in a process command")


# Parameter types whose values can be checked without a running app. By name: typer carries a
# click of its own (`typer._click`), whose classes are not click's.
_PLAIN_TYPES = {"IntParamType", "FloatParamType", "BoolParamType"}


def _resolve(words: tuple[str, ...]) -> list[str]:
    """Parse a command line with the program's own click parser, subcommand by subcommand, as
    the real program would (unknown options, missing values and bad numbers fail); return the
    subcommand path. Nothing runs."""
    command = _click_command(words[0])
    context = command.context_class(command, info_name=words[0])
    args, path = list(words[1:]), list[str]()
    while True:
        options, rest, _ = command.make_parser(context).parse_args(args=args)
        for param in command.params:
            kind = type(getattr(param, "type", None)).__name__
            if param.name in options and kind in _PLAIN_TYPES:
                param.type_cast_value(context, options[param.name])
        if not (hasattr(command, "get_command") and rest):
            assert not rest, f"stray arguments {rest} in {' '.join(words)}"
            return path
        name, args = rest[0], rest[1:]
        sub = command.get_command(context, name)
        assert sub is not None, f"{' '.join(path) or words[0]} has no subcommand {name!r}"
        path.append(name)
        if name == "flower":
            _check_flower_options(args)
            return path
        command, context = sub, sub.context_class(sub, info_name=name, parent=context)


@pytest.mark.parametrize(
    "invocation",
    [i for i in invocations() if i.words[0] != "rm"],
    ids=lambda i: f"{i.source}:{i.process}:{i.words[0]}",
)
def test_every_command_and_option_resolves(invocation: Invocation):
    path = _resolve(invocation.words)
    expected_path = {
        "celery": [_celery_parts(invocation.words)[1]],
        "uvicorn": [],
        "refundq": [w for w in invocation.words[1:3] if not w.startswith("-")],
    }[invocation.words[0]]
    assert path == expected_path


def _check_flower_options(args: list[str]) -> None:
    """Flower hands its options to tornado, not click: check them against Flower's own list."""
    from flower.options import default_options

    for word in args:
        name = word.lstrip("-").split("=", 1)[0].replace("-", "_")
        assert name in default_options, f"Flower has no option {word!r}"
    conf = Path(next(w.split("=", 1)[1] for w in args if w.startswith("--conf=")))
    # In the image the checkout is /app (Dockerfile WORKDIR); a Procfile runs in the checkout.
    relative = conf.relative_to("/app") if conf.is_absolute() else conf
    assert REPO / relative == FLOWER_CONFIG and FLOWER_CONFIG.exists(), conf


def test_apps_import_as_the_commands_name_them():
    code = (
        "import importlib, json\n"
        f"targets = {sorted(APP_TYPES)!r}\n"
        "found = {}\n"
        "for target in targets:\n"
        "    module, attr = target.split(':')\n"
        "    value = getattr(importlib.import_module(module), attr)\n"
        "    found[target] = [f'{c.__module__}.{c.__qualname__}' for c in type(value).__mro__]\n"
        "print(json.dumps(found))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDQ_")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    for target, expected in APP_TYPES.items():
        assert expected in found[target], f"{target} is a {found[target][0]}, not a {expected}"
    # ...and those are the targets the commands name.
    named = set()
    for invocation in invocations():
        if invocation.words[0] == "celery":
            named.add(f"{_celery_parts(invocation.words)[0]}:app")
        elif invocation.words[0] == "uvicorn":
            named.add(invocation.words[1])
    assert named == set(APP_TYPES)


def test_the_refundq_console_script_is_the_typer_app():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["refundq"] == "worker.cli:main"


def test_refundq_sandbox_help_runs():
    argv = (sys.executable, "-m", "worker.cli", "sandbox", "--help")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDQ_")}
    result = subprocess.run(
        argv,
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--keys-dir" in result.stdout and "--env-file" in result.stdout


# ---- the image ---------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_the_dockerfile_installs_the_project_and_runs_unprivileged():
    instructions = _dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    base = dict(instructions)["FROM"]
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert base.startswith("python:3.11"), base
    assert required == ">=3.11"
    assert ("WORKDIR", "/app") in instructions
    assert ("COPY", ". .") in instructions
    runs = [rest for k, rest in instructions if k == "RUN"]
    assert any(re.search(r"pip install (--no-deps )?\.(\s|$)", r) for r in runs), runs
    # The last USER is not root, and comes after every install step.
    users = [i for i, k in enumerate(keywords) if k == "USER"]
    assert users and instructions[users[-1]][1] not in ("root", "0")
    assert users[-1] > max(i for i, k in enumerate(keywords) if k == "RUN")


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        hit = any(
            fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", ""))
            for prefix in prefixes
        )
        if hit:
            ignored = not negate
    return ignored


def test_the_build_context_keeps_what_the_install_and_the_processes_need():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = [
        "pyproject.toml",
        "README.md",
        "flowerconfig.py",
        "worker/app.py",
        "worker/cli.py",
        "worker/migrations/env.py",
        "tasks/__init__.py",
        "providers/base.py",
        "sandbox/app.py",
    ]
    needed += [
        str(p.relative_to(REPO)) for p in (REPO / "worker" / "migrations" / "versions").glob("*.py")
    ]
    assert [p for p in needed if _ignored(p, patterns)] == []
    for secret in (".env", ".refundq-sandbox/bbmsl_private.pem", ".git/config", "refundq.db"):
        assert _ignored(secret, patterns), secret


def test_every_refundq_service_runs_the_one_image_built_from_the_dockerfile():
    services = compose_file()["services"]
    for name in [*PROCESSES, "migrate"]:
        service = services[name]
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name
        assert service["image"] == services["web"]["image"], name


# ---- the compose wiring ----------------------------------------------------------------------


def _env(lines: list[str]) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in lines)
    return {name: value for name, value in pairs}


def _healthcheck(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def test_compose_brokers_on_durable_redis_and_checks_every_service_health():
    services = compose_file()["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    assert "redis-cli ping" in _healthcheck(services["redis"])
    assert "pg_isready" in _healthcheck(services["postgres"])
    assert "/healthz" in _healthcheck(services["web"])
    assert "/_admin/" in _healthcheck(services["sandbox"])
    assert "/healthcheck" in _healthcheck(services["flower"])
    assert "inspect ping" in _healthcheck(services["worker"])


def _option(words: list[str], name: str) -> str:
    for index, word in enumerate(words):
        if word == name:
            return words[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {words}")


def test_compose_wires_the_worker_to_the_sandbox(monkeypatch: pytest.MonkeyPatch):
    from sandbox.config import SandboxConfig
    from sandbox.serve import env_lines

    for name in [n for n in os.environ if n.startswith("REFUNDQ_SANDBOX_")]:
        monkeypatch.delenv(name)
    services = compose_file()["services"]
    (sandbox_words,) = _simple_commands(services["sandbox"]["command"])
    port = _option(sandbox_words, "--port")
    keys_dir = _option(sandbox_words, "--keys-dir")
    expected = _env(
        env_lines(
            f"http://sandbox:{port}",
            SandboxConfig(_env_file=None),  # type: ignore[call-arg]
            f"{keys_dir}/bbmsl_private.pem",
        )
    )
    # The key pair the sandbox writes reaches the worker (and web) through one named volume.
    sandbox_volume = next(v for v in services["sandbox"]["volumes"] if v.split(":")[1] == keys_dir)
    for name in ("worker", "web"):
        environment = services[name]["environment"]
        assert {k: environment.get(k) for k in expected} == expected, name
        assert sandbox_volume.split(":")[0] + ":" + keys_dir + ":ro" in services[name]["volumes"]
        assert environment["REFUNDQ_BROKER_URL"].startswith("redis://redis:6379/")
        assert environment["REFUNDQ_DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in environment["REFUNDQ_DATABASE_URL"]
        (web_words,) = _simple_commands(services["web"]["command"])
        web_port = _option(web_words, "--port")
        assert environment["REFUNDQ_VAULTSPAY_CALLBACK_BASE_URL"] == f"http://web:{web_port}"
        assert environment["REFUNDQ_WEBHOOK_SECRET"].startswith("${REFUNDQ_WEBHOOK_SECRET:?")
    assert services["worker"]["depends_on"]["sandbox"]["condition"] == "service_healthy"
    # Flower and beat never get gateway credentials.
    for name in ("flower", "beat"):
        assert not [k for k in services[name]["environment"] if "SECRET" in k or "API_KEY" in k]


def test_compose_requires_flower_credentials_and_runs_flower_with_its_config():
    flower = compose_file()["services"]["flower"]
    auth = flower["environment"]["REFUNDQ_FLOWER_BASIC_AUTH"]
    assert auth.startswith("${REFUNDQ_FLOWER_BASIC_AUTH:?"), auth
    (words,) = _simple_commands(flower["command"])
    assert _option(words, "--conf") == "/app/flowerconfig.py"
    published = flower["ports"]
    assert all(p.startswith("127.0.0.1:") for p in published), published


def test_sandbox_env_points_at_the_procfile_sandbox(monkeypatch: pytest.MonkeyPatch):
    from honcho.environ import parse

    from sandbox.config import SandboxConfig
    from sandbox.serve import env_lines

    for name in [n for n in os.environ if n.startswith("REFUNDQ_SANDBOX_")]:
        monkeypatch.delenv(name)
    (words,) = _simple_commands(procfile_processes()["sandbox"])
    host, port = _option(words, "--host"), _option(words, "--port")
    keys_dir = _option(words, "--keys-dir")
    expected = _env(
        env_lines(
            f"http://{host}:{port}",
            SandboxConfig(_env_file=None),  # type: ignore[call-arg]
            f"{keys_dir}/bbmsl_private.pem",
        )
    )
    written = parse((REPO / "sandbox.env").read_text())
    assert {k: written.get(k) for k in expected} == expected
    # Vaultspay calls back to web, which honcho starts on port 5000 (its first $PORT).
    assert written["REFUNDQ_VAULTSPAY_CALLBACK_BASE_URL"] == "http://127.0.0.1:5000"


# ---- a compose client, where one is installed -------------------------------------------------


def _compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose_client() is None, reason="no docker compose client installed")
def test_compose_config_validates_and_refuses_to_start_without_the_secrets(tmp_path: Path):
    client = _compose_client()
    assert client is not None
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = [*client, "--env-file", str(empty), "-f", str(COMPOSE_FILE), "config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDQ_")}
    secrets = {"REFUNDQ_FLOWER_BASIC_AUTH": "ops:pw", "REFUNDQ_WEBHOOK_SECRET": "w" * 32}

    ok = subprocess.run(base, env={**env, **secrets}, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    for missing in secrets:
        partial = {k: v for k, v in secrets.items() if k != missing}
        refused = subprocess.run(
            base, env={**env, **partial}, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0
        assert missing in refused.stderr
