"""Rotating SECRET_KEY: SECRET_KEY_FALLBACKS is read (the environment: comma-separated; or
``app.config``: a list), validated like SECRET_KEY when deployed, never shown, and handed to
Flask and keyed state. The drill runs real gunicorn processes: signed in on the old key, the
user stays signed in on the new one, and a conversation written before is still found."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.cli import ScriptInfo

from pyloto_corp import ConfigurationError, SessionStore, Settings
from pyloto_corp.cli import session_store_cli
from pyloto_corp.config.settings import Var
from tests.conftest import DEPLOYED_COOKIE, SECRET
from tests.services import Gunicorn

#: Valid deployed keys (32+ characters, not a pattern) that appear nowhere else.
OLD_KEY = "Q7z-old-key-4fJ9qLw2XbN8vKc1TzR6yHd3"
OLDER_KEY = "Q7z-older-key-8sPm2VxQ5nLc7JwD0gRa4"
NEW_KEY = "Q7z-new-key-Wm5Tz1Ke8RbH3yLq6NcV9pXj"
DEPLOYED = {
    Var.ENV: "production",
    Var.SESSION_STORE_BACKEND: "redis",
    "REDIS_URL": "redis://cache:6379/0",
    Var.SECRET_KEY: NEW_KEY,
}


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "keys"),
    [
        (OLD_KEY, (OLD_KEY,)),
        (f"{OLD_KEY},{OLDER_KEY}", (OLD_KEY, OLDER_KEY)),
        (f" {OLD_KEY} , {OLDER_KEY} ,", (OLD_KEY, OLDER_KEY)),
        ("", ()),
        (" , ", ()),
    ],
)
def test_the_environment_gives_a_comma_separated_list(value: str, keys: tuple[str, ...]) -> None:
    settings = Settings.from_env({**DEPLOYED, Var.SECRET_KEY_FALLBACKS: value})
    assert settings.secret_key_fallbacks == keys
    assert settings.validate() == []


def test_unset_means_none() -> None:
    assert Settings.from_env(DEPLOYED).secret_key_fallbacks == ()
    assert Settings(secret_key_fallbacks=[OLD_KEY]).secret_key_fallbacks == (OLD_KEY,)


def _registered(config: dict[str, Any], environ: dict[str, str] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    SessionStore(app, Settings.from_env(environ or DEPLOYED))
    return app


def test_the_environments_keys_are_handed_to_flask() -> None:
    """Flask 3.1 verifies its signatures under them; keyed state derives its keys from them."""
    app = _registered({}, {**DEPLOYED, Var.SECRET_KEY_FALLBACKS: f"{OLD_KEY},{OLDER_KEY}"})
    assert app.config["SECRET_KEY"] == NEW_KEY
    assert app.config["SECRET_KEY_FALLBACKS"] == [OLD_KEY, OLDER_KEY]
    assert SessionStore.state(app).settings.secret_key_fallbacks == (OLD_KEY, OLDER_KEY)


@pytest.mark.parametrize("keys", [[OLD_KEY, OLDER_KEY.encode()], (OLD_KEY,)])
def test_the_host_apps_own_list_is_used_and_kept(keys: list[str | bytes]) -> None:
    app = _registered({"SECRET_KEY_FALLBACKS": keys})
    assert app.config["SECRET_KEY_FALLBACKS"] is keys  # never replaced
    assert SessionStore.state(app).settings.secret_key_fallbacks == tuple(keys)


def test_the_same_list_in_both_places_is_fine_different_lists_are_refused() -> None:
    environ = {**DEPLOYED, Var.SECRET_KEY_FALLBACKS: OLD_KEY}
    _registered({"SECRET_KEY_FALLBACKS": [OLD_KEY]}, environ)
    with pytest.raises(ConfigurationError) as caught:
        _registered({"SECRET_KEY_FALLBACKS": [OLDER_KEY]}, environ)
    assert caught.value.problems == (
        "app.config['SECRET_KEY_FALLBACKS'] and SECRET_KEY_FALLBACKS (from the environment or "
        "the Settings) disagree; set it in one place.",
    )


@pytest.mark.parametrize("value", [OLD_KEY, OLD_KEY.encode(), 42, [OLD_KEY, None]])
def test_anything_but_a_list_of_keys_in_app_config_is_refused_unechoed(value: object) -> None:
    """A string would be read by Flask one character at a time: 36 one-character keys."""
    with pytest.raises(ConfigurationError) as caught:
        _registered({"SECRET_KEY_FALLBACKS": value}, {**DEPLOYED, Var.ENV: "development"})
    assert caught.value.problems == (
        "SECRET_KEY_FALLBACKS must be a list of keys (strings or bytes); in the environment, "
        "separate them with commas.",
    )
    assert OLD_KEY not in f"{caught.value}{caught.value!r}"


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "where"),
    [
        ({Var.ENV: "production"}, "in production"),
        ({Var.ENV: "staging"}, "in staging"),
        ({Var.ENV: "development", Var.K_SERVICE: "api"}, "on Cloud Run (K_SERVICE is set)"),
    ],
)
def test_each_key_is_held_to_the_secret_key_rules_when_deployed(
    environ: dict[str, str], where: str
) -> None:
    short, weak = "Q7z-short-key-1234", "Q7z-" + "ab" * 16
    value = f"{OLD_KEY},{short},{weak}"
    settings = Settings.from_env({**DEPLOYED, **environ, Var.SECRET_KEY_FALLBACKS: value})
    problems = settings.validate()
    assert problems == [
        f"SECRET_KEY_FALLBACKS entry 2 is too short {where}: it needs at least 32 characters.",
        f"SECRET_KEY_FALLBACKS entry 3 is too weak {where}: it repeats a short pattern or uses "
        "fewer than 8 different characters; generate one with "
        "python -c 'import secrets; print(secrets.token_urlsafe(48))'.",
    ]
    for key in (OLD_KEY, short, weak):
        assert key not in "\n".join(problems)
    local = Settings.from_env({**DEPLOYED, Var.ENV: "test", Var.SECRET_KEY_FALLBACKS: value})
    assert local.validate() == []


def test_bytes_keys_from_the_host_are_held_to_the_same_rules() -> None:
    with pytest.raises(ConfigurationError) as caught:
        _registered({"SECRET_KEY_FALLBACKS": [b"Q7z-too-short"]})
    assert caught.value.problems == (
        "SECRET_KEY_FALLBACKS entry 1 is too short in production: it needs at least 32 characters.",
    )


# -- never shown -----------------------------------------------------------------------------------


def test_no_key_is_ever_shown() -> None:
    """repr, the redacted view, ``info`` (text and JSON), ``check`` and a refusal: one ``***``
    per key, never a key."""
    environ = {**DEPLOYED, Var.SECRET_KEY_FALLBACKS: f"{OLD_KEY},{OLDER_KEY}"}
    settings = Settings.from_env(environ)
    assert settings.redacted()[Var.SECRET_KEY_FALLBACKS] == ["***", "***"]
    said = [repr(settings), str(settings), str(settings.redacted())]
    runner = CliRunner()
    info = runner.invoke(session_store_cli, ["info", "--json"], env=environ)
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)[Var.SECRET_KEY_FALLBACKS] == ["***", "***"]
    said.append(info.output)
    for command in (["info"], ["check"], ["check", "--env", "staging"]):
        result = runner.invoke(session_store_cli, command, env=environ)
        assert result.exit_code == 0, result.output
        said.append(result.output)
    refused = runner.invoke(
        session_store_cli, ["check"], env={**environ, Var.SECRET_KEY_FALLBACKS: "Q7z-short,x"}
    )
    assert refused.exit_code == 1
    said.append(refused.output)
    text = "\n".join(said)
    for key in (OLD_KEY, OLDER_KEY, NEW_KEY, "Q7z-short"):
        assert key not in text


def test_a_host_apps_keys_are_never_shown_by_the_cli() -> None:
    """``flask --app`` an app whose fallbacks are in ``app.config`` (as bytes too)."""
    app = _registered({"SECRET_KEY_FALLBACKS": [OLD_KEY, OLDER_KEY.encode()]})
    runner = CliRunner()
    said = []
    for command in (["info"], ["info", "--json"], ["check"]):
        result = runner.invoke(
            session_store_cli, command, obj=ScriptInfo(create_app=lambda: app), env=DEPLOYED
        )
        assert result.exit_code == 0, result.output
        said.append(result.output)
    assert "***" in said[0]
    for key in (OLD_KEY, OLDER_KEY, str(OLDER_KEY.encode()), NEW_KEY):
        assert key not in "\n".join(said)


# -- the drill, through real gunicorn --------------------------------------------------------------


class Browser:
    """A cookie jar that sends what it holds and applies every Set-Cookie it gets back."""

    def __init__(self, jar: dict[str, str] | None = None) -> None:
        self.jar = dict(jar or {})
        self.set_cookies: list[str] = []

    def call(
        self, server: Gunicorn, method: str, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, str]:
        headers = {"Accept": "application/json"}
        if self.jar:
            headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in self.jar.items())
        body = None
        if form is not None:
            body = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            text = response.read().decode()
            for name, value in response.getheaders():
                if name.lower() == "set-cookie":
                    self._apply(value)
            return response.status, text
        finally:
            connection.close()

    def _apply(self, header: str) -> None:
        self.set_cookies.append(header)
        name, _, rest = header.partition("=")
        value = rest.split(";", 1)[0]
        if value and "max-age=0" not in header.lower():
            self.jar[name] = value
        else:
            self.jar.pop(name, None)

    def user(self, server: Gunicorn) -> str:
        status, text = self.call(server, "GET", "/me")
        assert status == 200, text
        user: str = json.loads(text)["user"]
        return user


@pytest.fixture(params=["redis_env", "firestore_env"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env: dict[str, str] = request.getfixturevalue(request.param)
    return env


@pytest.fixture
def serve(tmp_path: Path, store_env: dict[str, str]) -> Iterator[Any]:
    """``serve(SECRET_KEY=..., ...)``: the rotation app on a fresh gunicorn, on the test store."""
    started: list[Gunicorn] = []

    def start(**keys: str) -> Gunicorn:
        environ = {k: v for k, v in store_env.items() if k != Var.SECRET_KEY}
        server = Gunicorn(tmp_path, {**environ, **keys}, app="tests.rotation_app:app")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        for key in (OLD_KEY, NEW_KEY):
            assert key not in server.output()


def _conversation(server: Gunicorn, sender: str) -> Any:
    status, text = Browser().call(server, "GET", f"/conversation/{sender}")
    assert status == 200, text
    return json.loads(text)["state"]


def test_rotation_drill(serve: Any) -> None:
    before = serve(SECRET_KEY=OLD_KEY)
    browser = Browser()
    status, token = browser.call(before, "GET", "/form")
    assert status == 200
    cookie = next(h for h in browser.set_cookies if h.startswith(f"{DEPLOYED_COOKIE}="))
    assert {"Secure", "HttpOnly", "Path=/"} <= {part.strip() for part in cookie.split(";")}
    assert "domain=" not in cookie.lower()
    status, _ = browser.call(before, "POST", "/login", {"user": "ana", "csrf_token": token})
    assert status == 200
    assert browser.user(before) == "ana"
    remember = {"remember_token": browser.jar["remember_token"]}
    assert Browser(remember).user(before) == "ana"  # the remember-me cookie alone signs in
    _, open_form = browser.call(before, "GET", "/form")  # a form still open at the rotation
    assert browser.call(before, "POST", "/submit", {"csrf_token": open_form})[0] == 200
    for sender in ("+15550001", "+15550002"):
        assert browser.call(before, "POST", f"/webhook/{sender}") == (200, '{"messages":1}\n')
    before.stop()

    # The deploy that rotates: the new key, the old one as the fallback.
    after = serve(SECRET_KEY=NEW_KEY, SECRET_KEY_FALLBACKS=OLD_KEY)
    assert browser.user(after) == "ana"  # the session survives
    assert _conversation(after, "+15550001") == {"messages": 1}  # found under the fallback
    assert browser.call(after, "POST", "/webhook/+15550001") == (200, '{"messages":2}\n')
    # Flask-WTF and Flask-Login sign with the current key only: invalidated, once.
    status, text = browser.call(after, "POST", "/submit", {"csrf_token": open_form})
    assert status == 400
    assert "CSRF token is invalid" in text
    _, reloaded = browser.call(after, "GET", "/form")
    assert browser.call(after, "POST", "/submit", {"csrf_token": reloaded})[0] == 200
    assert Browser(remember).user(after) == "anonymous"
    after.stop()

    # Later, the fallback dropped: a session never depended on the key; the conversation that
    # was written since lives under the new key, the one that was not is gone with the old key.
    later = serve(SECRET_KEY=NEW_KEY)
    assert browser.user(later) == "ana"
    assert _conversation(later, "+15550001") == {"messages": 2}
    assert _conversation(later, "+15550002") is None


def test_a_weak_fallback_stops_gunicorn_before_it_serves(tmp_path: Path) -> None:
    environ = {**DEPLOYED, Var.SECRET_KEY: SECRET, Var.SECRET_KEY_FALLBACKS: "Q7z-" + "ab" * 16}
    server = Gunicorn(tmp_path, environ, app="tests.rotation_app:app")
    with pytest.raises(RuntimeError, match="gunicorn exited") as caught:
        server.start()
    assert "SECRET_KEY_FALLBACKS entry 1 is too weak in production" in str(caught.value)
    assert "abababab" not in str(caught.value)
