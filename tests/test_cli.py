"""The session-store CLI, through click's runner and as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pyloto_corp.cli import session_store_cli
from tests.conftest import SECRET
from tests.services import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, **environ: str) -> Result:
    return CliRunner().invoke(session_store_cli, list(args), env=environ)


def test_check_passes_for_a_valid_configuration() -> None:
    result = _run("check")
    assert result.exit_code == 0
    assert "valid for environment 'development' (session store: memory)" in result.output


def test_check_lists_every_problem_and_exits_1() -> None:
    result = _run("check", "--env", "prod", SECRET_KEY="short-but-secret")
    assert result.exit_code == 1
    assert "environment 'production' (2 problems)" in result.output
    assert "short-but-secret" not in result.output


def test_info_redacts_every_secret() -> None:
    result = _run(
        "info",
        "--json",
        SESSION_STORE_BACKEND="redis",
        SECRET_KEY=SECRET,
        REDIS_URL="redis://:redis-pass-77@cache:6379/0",
        WHATSAPP_ACCESS_TOKEN="EAAG-tok-55",
    )
    assert result.exit_code == 0
    values = json.loads(result.output)
    assert values["SECRET_KEY"] == "***"
    assert values["WHATSAPP_ACCESS_TOKEN"] == "***"
    assert values["REDIS_URL"] == "redis://***@cache:6379/0"
    for secret in (SECRET, "redis-pass-77", "EAAG-tok-55"):
        assert secret not in result.output


def test_ping_reports_latency_of_the_real_redis(redis_server: RedisServer) -> None:
    result = _run("ping", SESSION_STORE_BACKEND="redis", REDIS_URL=redis_server.url)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("redis answered in ")


def test_ping_fails_with_one_line_when_redis_is_down() -> None:
    url = f"redis://:pw-secret-1@127.0.0.1:{free_port()}/0"
    result = _run("ping", SESSION_STORE_BACKEND="redis", REDIS_URL=url, REDIS_CONNECT_TIMEOUT="1")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "Redis session store at redis://***@127.0.0.1" in lines[0]
    assert "pw-secret-1" not in result.output


def test_ping_with_a_bad_configuration_says_why() -> None:
    result = _run("ping", SESSION_STORE_BACKEND="redis")
    assert result.exit_code == 1
    assert "REDIS_URL is required" in result.output


def test_cleanup_deletes_expired_firestore_documents(
    firestore_env: dict[str, str], firestore_client: Any
) -> None:
    sessions = firestore_client.collection("sessions")
    now = datetime.now(UTC)
    sessions.document("session:expired").set({"data": b"\x80", "expires_at": now - timedelta(1)})
    sessions.document("session:live").set({"data": b"\x80", "expires_at": now + timedelta(1)})
    result = _run("cleanup", **firestore_env)
    assert result.exit_code == 0, result.output
    assert "Deleted 1 expired session(s) from collection 'sessions'." in result.output
    assert [snapshot.id for snapshot in sessions.stream()] == ["session:live"]


def test_cleanup_is_not_needed_for_redis() -> None:
    result = _run("cleanup", SESSION_STORE_BACKEND="redis", REDIS_URL="redis://r")
    assert result.exit_code == 0
    assert "Nothing to do" in result.output


def test_every_command_has_help() -> None:
    for command in ("check", "info", "ping", "cleanup"):
        result = _run(command, "--help")
        assert result.exit_code == 0
        assert "Usage:" in result.output


def _subprocess(args: list[str], **environ: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "SESSION_STORE_BACKEND")}
    env.update(FLASK_SKIP_DOTENV="1", **environ)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(
    "prefix",
    [["-m", "pyloto_corp"], ["-m", "flask", "--app", "wsgi", "session-store"]],
    ids=["python-m", "flask"],
)
def test_check_works_even_when_the_app_cannot_be_built(prefix: list[str]) -> None:
    result = _subprocess([*prefix, "check"], ENV="production", SECRET_KEY=SECRET)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "SESSION_STORE_BACKEND=memory is refused in production" in result.stderr
    ok = _subprocess([*prefix, "check"], ENV="development")
    assert ok.returncode == 0, ok.stderr
    assert "valid for environment 'development'" in ok.stdout


def test_info_and_ping_use_the_store_of_the_loaded_app(redis_server: RedisServer) -> None:
    """The app sets its store in app.config; the environment says nothing about it."""
    prefix = ["-m", "flask", "--app", "tests.cli_app", "session-store"]
    info = _subprocess([*prefix, "info", "--json"], CLI_APP_REDIS_URL=redis_server.url)
    assert info.returncode == 0, info.stderr
    values = json.loads(info.stdout)
    assert values["SESSION_STORE_BACKEND"] == "redis"
    assert values["SESSION_KEY_PREFIX"] == "cliapp:"
    assert values["SECRET_KEY"] == "***"
    assert "cli-app-own-secret" not in info.stdout
    ping = _subprocess([*prefix, "ping"], CLI_APP_REDIS_URL=redis_server.url)
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.startswith("redis answered in ")
    down = _subprocess([*prefix, "ping"], CLI_APP_REDIS_URL=f"redis://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert "Redis session store at redis://127.0.0.1" in down.stderr


def test_check_info_and_ping_of_an_app_that_gives_its_own_client(
    redis_server: RedisServer,
) -> None:
    """SESSION_TYPE='redis' with SESSION_REDIS, validated for production, no REDIS_URL."""
    prefix = ["-m", "flask", "--app", "tests.cli_client_app", "session-store"]
    environ = {"CLI_APP_REDIS_PORT": str(redis_server.port), "ENV": "production"}
    check = _subprocess([*prefix, "check"], **environ)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == (
        "Configuration is valid for environment 'production' "
        "(session store: redis, client given by the app)."
    )
    info = _subprocess([*prefix, "info", "--json"], **environ)
    assert info.returncode == 0, info.stderr
    values = json.loads(info.stdout)
    assert values["REDIS_URL"] == "client given by the app"
    assert values["SESSION_STORE_BACKEND"] == "redis"
    text = _subprocess([*prefix, "info"], **environ)
    assert "client given by the app" in text.stdout
    ping = _subprocess([*prefix, "ping"], **environ)
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.startswith("redis answered in ")
    # The same app's other rules still apply: staging wants what production wants.
    staged = _subprocess([*prefix, "check", "--env", "staging"], **environ)
    assert staged.returncode == 0, staged.stderr
    assert "environment 'staging'" in staged.stdout


def test_check_of_a_loaded_app_reports_its_problems(redis_server: RedisServer) -> None:
    prefix = ["-m", "flask", "--app", "tests.cli_app", "session-store"]
    result = _subprocess(
        [*prefix, "check"], CLI_APP_REDIS_URL=redis_server.url, SESSION_LIFETIME="0"
    )
    assert result.returncode == 1
    assert "SESSION_LIFETIME must be a positive duration" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_app_that_fails_to_load_is_one_line_without_its_message() -> None:
    prefix = ["-m", "flask", "--app", "tests.cli_app", "session-store"]
    result = _subprocess([*prefix, "check"])  # CLI_APP_REDIS_URL unset: a KeyError at import
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "The app could not be loaded: KeyError while importing or building" in result.stderr
