"""``flask session-store state get|delete`` and the namespaces in ``check``/``info``: the real
``flask`` command against an app that creates keyed state, on redis and the Firestore emulator.
An operator reads or erases one conversation by its id; the id (a phone number) is never
printed back, and a store that is down is one line, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from flask.cli import ScriptInfo

from pyloto_corp.cli import session_store_cli
from pyloto_corp.config.settings import Settings
from pyloto_corp.session_store import SessionStore
from pyloto_corp.state import KeyedState, store_key
from tests.conftest import SECRET, redis_production_env
from tests.services import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
PHONE = "5511987654321"
STATE = ["-m", "flask", "--app", "tests.cli_state_app", "session-store", "state"]
SESSION_STORE = ["-m", "flask", "--app", "tests.cli_state_app", "session-store"]

# The namespaces as tests/cli_state_app.py creates them, to write the entries the CLI reads.
conversations = KeyedState("conversations", lifetime=timedelta(hours=2))
reminders = KeyedState("reminders", lifetime=timedelta(days=30))


@pytest.fixture(params=["redis", "firestore"])
def environ(request: pytest.FixtureRequest) -> dict[str, str]:
    """A valid production configuration on the backend's real service, emptied."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.client().flushdb()
        return redis_production_env(server.url)
    firestore_env: dict[str, str] = request.getfixturevalue("firestore_env")
    return firestore_env


@pytest.fixture
def redis_environ(redis_server: RedisServer) -> dict[str, str]:
    redis_server.client().flushdb()
    return redis_production_env(redis_server.url)


def _app(environ: dict[str, str]) -> Flask:
    """An app on the same store, with the same SECRET_KEY, as the one the CLI loads."""
    app = Flask("writer")
    SessionStore(app, Settings.from_env(environ))
    return app


def _flask(
    args: list[str], environ: dict[str, str], stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "SESSION_STORE_BACKEND")}
    env.update(FLASK_SKIP_DOTENV="1", **environ)
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


def _no_phone(*results: subprocess.CompletedProcess[str] | Result) -> None:
    for result in results:
        assert PHONE not in result.stdout
        assert PHONE not in result.stderr


def test_get_prints_the_entry_and_delete_erases_it(environ: dict[str, str]) -> None:
    app = _app(environ)
    with app.app_context(), conversations.open(PHONE) as state:
        state.update(
            {
                "step": "ask_cpf",
                "history": ["oi", "olá, tudo bem?"],
                "amount": Decimal("10.50"),
                "when": datetime(2026, 12, 2, 9, 30, tzinfo=UTC),
                "pair": (1, "a"),
                "raw": b"\x00\xff",
            }
        )
    got = _flask([*STATE, "get", "conversations", PHONE], environ)
    assert got.returncode == 0, got.stderr
    assert got.stderr == ""
    assert json.loads(got.stdout) == {
        "step": "ask_cpf",
        "history": ["oi", "olá, tudo bem?"],
        "amount": "Decimal('10.50')",
        "when": "datetime.datetime(2026, 12, 2, 9, 30, tzinfo=datetime.timezone.utc)",
        "pair": [1, "a"],
        "raw": "b'\\x00\\xff'",
    }
    assert "olá, tudo bem?" in got.stdout  # readable text, not \u escapes

    deleted = _flask([*STATE, "delete", "conversations", PHONE], environ)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == "Deleted the entry in 'conversations'.\n"
    with app.app_context():
        assert not conversations.exists(PHONE)

    none = _flask([*STATE, "get", "conversations", PHONE], environ)
    assert none.returncode == 1
    assert none.stdout == ""
    assert none.stderr == "No entry in 'conversations' for this id.\n"

    again = _flask([*STATE, "delete", "conversations", PHONE], environ)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "No entry in 'conversations' for this id: nothing to delete.\n"
    _no_phone(got, deleted, none, again)


def test_get_slides_the_expiry_by_the_lifetime_the_app_created_the_namespace_with(
    redis_environ: dict[str, str], redis_server: RedisServer
) -> None:
    """Not the 2-hour default: a 30-day reminder read by an operator still has 30 days."""
    with _app(redis_environ).app_context(), reminders.open(PHONE) as state:
        state["due"] = "2026-12-24"
    key = store_key("session:", SECRET, "reminders", PHONE)
    client = redis_server.client()
    client.pexpire(key, 60_000)
    got = _flask([*STATE, "get", "reminders", PHONE], redis_environ)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {"due": "2026-12-24"}
    assert client.pttl(key) > timedelta(days=29).total_seconds() * 1000


def test_a_namespace_the_app_did_not_create_is_said_aloud(redis_environ: dict[str, str]) -> None:
    with _app(redis_environ).app_context(), conversations.open(PHONE) as state:
        state["step"] = "ask_cpf"
    typo = _flask([*STATE, "get", "conversation", PHONE], redis_environ)
    assert typo.returncode == 1
    assert typo.stderr.splitlines() == [
        "Warning: the app created no KeyedState('conversation') (its namespaces: "
        "conversations: 2h, reminders: 30d); using the default lifetime, 2h.",
        "No entry in 'conversation' for this id.",
    ]
    # Without an app (python -m pyloto_corp), the environment's store, the default lifetime.
    bare = _flask(["-m", "pyloto_corp", "state", "get", "conversations", PHONE], redis_environ)
    assert bare.returncode == 0, bare.stderr
    assert json.loads(bare.stdout) == {"step": "ask_cpf"}
    assert "(its namespaces: none); using the default lifetime, 2h." in bare.stderr
    _no_phone(typo, bare)


def _down(backend: str) -> tuple[dict[str, str], str]:
    """A configuration whose store does not answer, and how the error begins."""
    if backend == "redis":
        url = f"redis://:pw-secret-2@127.0.0.1:{free_port()}/0"
        environ = redis_production_env(url, REDIS_ALLOW_PLAINTEXT_AUTH="true")
        return environ, "Error: Redis session store at redis://***@127.0.0.1:"
    environ = {
        "ENV": "production",
        "SESSION_STORE_BACKEND": "firestore",
        "FIRESTORE_PROJECT": "demo-down",
        "FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{free_port()}",
        "FIRESTORE_TIMEOUT": "1",
        "SECRET_KEY": SECRET,
    }
    return environ, "Error: Firestore session store (database '(default)', collection 'sessions')"


@pytest.mark.parametrize("backend", ["redis", "firestore"])
@pytest.mark.parametrize("command", ["get", "delete"])
def test_a_store_that_is_down_is_one_error_line_without_the_id(backend: str, command: str) -> None:
    environ, error = _down(backend)
    result = _flask([*STATE, command, "conversations", PHONE], environ)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # The store's own log line (what a request's failure logs too), then the command's error.
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(error), result.stderr
    assert result.stdout == ""
    assert "pw-secret-2" not in result.stderr
    _no_phone(result)


def test_check_and_info_list_the_namespaces_the_app_created(
    redis_environ: dict[str, str],
) -> None:
    check = _flask([*SESSION_STORE, "check"], redis_environ)
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines() == [
        "Configuration is valid for environment 'production' (session store: redis).",
        "Keyed state namespaces: conversations: 2h, reminders: 30d.",
    ]
    info = _flask([*SESSION_STORE, "info", "--json"], redis_environ)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["keyed_state"] == {"conversations": 7200, "reminders": 2592000}
    text = _flask([*SESSION_STORE, "info"], redis_environ)
    assert text.returncode == 0, text.stderr
    [row] = [line for line in text.stdout.splitlines() if line.startswith("keyed_state ")]
    assert row.split(None, 1)[1] == "conversations: 2h, reminders: 30d"


# -- In process (click's runner, the app given as Flask's ScriptInfo): input and formats ----------


def _run(app: Flask, *args: str, stdin: str | None = None) -> Result:
    info = ScriptInfo(create_app=lambda: app)
    return CliRunner().invoke(session_store_cli, list(args), obj=info, input=stdin)


def test_an_id_of_dash_is_read_from_stdin(redis_environ: dict[str, str]) -> None:
    """Keeps the phone number out of the shell history and the process list."""
    app = _app(redis_environ)
    with app.app_context(), conversations.open(PHONE) as state:
        state["step"] = "ask_cpf"
    got = _run(app, "state", "get", "conversations", "-", stdin=f"{PHONE}\n")
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout) == {"step": "ask_cpf"}
    deleted = _run(app, "state", "delete", "conversations", "-", stdin=f"{PHONE}\n")
    assert deleted.stdout == "Deleted the entry in 'conversations'.\n"
    with app.app_context():
        assert not conversations.exists(PHONE)
    _no_phone(got, deleted)


@pytest.mark.parametrize(
    ("namespace", "id", "message"),
    [
        ("", PHONE, "Error: namespace must be a non-empty str of printable characters"),
        ("conversations", "", "Error: id must be a non-empty str of at most 1024 characters"),
        ("conversations", PHONE * 100, "(str(number) for a numeric id); got 1300 characters"),
    ],
    ids=["empty-namespace", "empty-id", "long-id"],
)
def test_bad_input_is_one_line_naming_the_argument(
    redis_environ: dict[str, str], namespace: str, id: str, message: str
) -> None:
    app = _app(redis_environ)
    for command in ("get", "delete"):
        result = _run(app, "state", command, namespace, id)
        assert result.exit_code == 1
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stdout == ""
        _no_phone(result)


def test_the_help_says_how_values_are_shown_and_that_a_get_slides_the_expiry() -> None:
    result = CliRunner().invoke(session_store_cli, ["state", "get", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "shown as their Python repr, in a string: Decimal('10.50')" in text
    assert "Reading slides the entry's expiry, as any use does" in text
    for command in (["state"], ["state", "delete"]):
        assert CliRunner().invoke(session_store_cli, [*command, "--help"]).exit_code == 0


def test_lifetimes_are_shown_as_people_write_them(redis_environ: dict[str, str]) -> None:
    KeyedState("follow-ups", lifetime=timedelta(days=1, minutes=30, seconds=5))
    KeyedState("debounce", lifetime=timedelta(milliseconds=1500))
    app = _app(redis_environ)
    check = _run(app, "check")
    assert check.exit_code == 0, check.output
    assert "debounce: 1.5s" in check.stdout
    assert "follow-ups: 1d30m5s" in check.stdout
    info: dict[str, Any] = json.loads(_run(app, "info", "--json").stdout)
    assert info["keyed_state"]["debounce"] == 1.5
    assert info["keyed_state"]["follow-ups"] == 88205
