"""Flask-Limiter under the fail-fast rule: a deployed app refuses a per-process rate-limit storage
(on Cloud Run, one count per instance is no limit), and the switches that lift or split the limit
when the storage fails; a shared Redis storage is accepted and shared by every process."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from flask.cli import ScriptInfo
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from pyloto_corp import SessionStore
from pyloto_corp.cli import session_store_cli
from pyloto_corp.config.rate_limits import RateLimitStorage, rate_limit_storages
from pyloto_corp.config.settings import Settings
from pyloto_corp.errors import ConfigurationError
from tests.conftest import SECRET
from tests.services import ROOT, Gunicorn, RedisClusterNodes, RedisServer

REFUSED_MEMORY = "Flask-Limiter with RATELIMIT_STORAGE_URI=memory:// is refused in production"
REFUSED_NONE = "Flask-Limiter without RATELIMIT_STORAGE_URI is refused"
#: The password of a test redis-server (asserted never to appear).
RATE_LIMIT_PASSWORD = "rl-pass-Zq81xT"
#: Requests a minute one client may make to /limited.
LIMIT = 5
#: The README's storage options (redis-py's timeouts, as REDIS_SOCKET_TIMEOUT's default).
TIMEOUTS = {"socket_timeout": 2, "socket_connect_timeout": 2}


def _app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    app.testing = True
    return app


def _limit(app: Flask, **options: Any) -> Limiter:
    """A Flask-Limiter on ``app``, and /limited: LIMIT requests a minute per client."""
    limiter = Limiter(get_remote_address, app=app, **options)

    @app.get("/limited")
    @limiter.limit(f"{LIMIT} per minute")
    def limited() -> str:
        return "ok"

    return limiter


def _refusal(app: Flask, settings: Settings | None) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(app, settings)
    return caught.value


def _check(app: Flask, *args: str) -> Result:
    """``flask session-store check`` on ``app`` as it is now (as Flask loads it)."""
    info = ScriptInfo(create_app=lambda: app)
    return CliRunner().invoke(session_store_cli, ["check", *args], obj=info)


def _statuses(app: Flask, count: int) -> list[int]:
    client = app.test_client()
    return [client.get("/limited").status_code for _ in range(count)]


def test_memory_storage_in_production_is_refused_at_init_with_every_other_problem(
    redis_env: dict[str, str],
) -> None:
    """The Limiter is registered first: SessionStore's one error lists it with the others."""
    app = _app(RATELIMIT_STORAGE_URI="memory://")
    _limit(app)
    settings = Settings.from_env({**redis_env, "SECRET_KEY": ""})
    error = _refusal(app, settings)
    assert len(error.problems) == 2
    assert error.problems[0].startswith("SECRET_KEY is required in production")
    assert error.problems[1].startswith(REFUSED_MEMORY)
    assert "set RATELIMIT_STORAGE_URI (or Limiter(storage_uri=...))" in error.problems[1]
    assert "environment 'production' (2 problems)" in str(error)
    assert "pyloto_session_store" not in app.extensions


def test_a_limiter_registered_after_the_session_store_is_refused_by_check(
    redis_env: dict[str, str],
) -> None:
    """Real ``flask`` processes on tests/limiter_app.py: SessionStore first, then a Limiter on
    memory://. The app builds (init could not see the Limiter); check refuses it."""
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "SESSION_STORE_BACKEND")}
    env.update(redis_env, FLASK_SKIP_DOTENV="1", LIMITER_APP_STORAGE_URI="memory://")
    env.update(LIMITER_APP_LIMIT=str(LIMIT))
    prefix = [sys.executable, "-m", "flask", "--app", "tests.limiter_app"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
        )

    routes = run("routes")
    assert routes.returncode == 0, routes.stderr
    assert "/limited" in routes.stdout
    check = run("session-store", "check")
    assert check.returncode == 1
    assert "Traceback" not in check.stderr
    assert "(1 problem)" in check.stderr
    assert REFUSED_MEMORY in check.stderr


def test_the_same_app_is_refused_in_process_by_check_too(redis_env: dict[str, str]) -> None:
    app = _app()
    SessionStore(app, Settings.from_env(redis_env))
    _limit(app, storage_uri="memory://")
    result = _check(app)
    assert result.exit_code == 1
    assert REFUSED_MEMORY in result.output


@pytest.mark.filterwarnings("ignore:Using the in-memory storage:UserWarning")
def test_a_limiter_without_a_storage_uri_is_refused_when_deployed(
    redis_env: dict[str, str],
) -> None:
    """No storage URI is memory to Flask-Limiter (it warns; an explicit memory:// does not)."""
    app = _app()
    _limit(app)
    error = _refusal(app, Settings.from_env(redis_env))
    assert len(error.problems) == 1
    assert error.problems[0].startswith(f"{REFUSED_NONE} in production")


def test_rate_limit_configuration_without_a_storage_uri_is_refused_when_deployed(
    redis_env: dict[str, str],
) -> None:
    """A RATELIMIT_* key in app.config, the Limiter not registered yet: the same rule."""
    app = _app(RATELIMIT_DEFAULT="100 per minute")
    error = _refusal(app, Settings.from_env(redis_env))
    assert [problem[: len(REFUSED_NONE)] for problem in error.problems] == [REFUSED_NONE]


def test_on_cloud_run_a_memory_storage_is_refused_whatever_env_says(
    redis_env: dict[str, str],
) -> None:
    app = _app(RATELIMIT_STORAGE_URI="memory://")
    _limit(app)
    settings = Settings.from_env({**redis_env, "ENV": "development", "K_SERVICE": "api"})
    error = _refusal(app, settings)
    assert len(error.problems) == 1
    assert "memory:// is refused on Cloud Run (K_SERVICE is set)" in error.problems[0]


def test_the_environment_variable_is_judged_too(
    redis_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {**redis_env, "RATELIMIT_STORAGE_URI": "memory://"}.items():
        monkeypatch.setenv(name, value)
    error = _refusal(_app(), None)
    assert [problem[: len(REFUSED_MEMORY)] for problem in error.problems] == [REFUSED_MEMORY]


@pytest.mark.filterwarnings("ignore:Using the in-memory storage:UserWarning")
def test_a_storage_uri_left_in_the_environment_is_named_when_the_limiter_ignores_it(
    redis_env: dict[str, str], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flask-Limiter reads app.config only: a URI set only in the environment is not used."""
    for name, value in {**redis_env, "RATELIMIT_STORAGE_URI": redis_server.url}.items():
        monkeypatch.setenv(name, value)
    app = _app()
    _limit(app)
    (problem,) = _refusal(app, None).problems
    assert problem.startswith(REFUSED_NONE)
    assert "the environment's RATELIMIT_STORAGE_URI is not read by Flask-Limiter" in problem


SWALLOW = "RATELIMIT_SWALLOW_ERRORS (or Limiter(swallow_errors=True)) is refused in production"
FALLBACK = "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED (or RATELIMIT_IN_MEMORY_FALLBACK"


@pytest.mark.parametrize(
    ("config", "options", "environ", "refused"),
    [
        ({"RATELIMIT_SWALLOW_ERRORS": True}, {}, {}, SWALLOW),
        ({}, {"swallow_errors": True}, {}, SWALLOW),
        ({}, None, {"RATELIMIT_SWALLOW_ERRORS": "true"}, SWALLOW),
        ({"RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True}, {}, {}, FALLBACK),
        ({"RATELIMIT_IN_MEMORY_FALLBACK": "10 per minute"}, {}, {}, FALLBACK),
        ({}, {"in_memory_fallback_enabled": True}, {}, FALLBACK),
        ({}, {"in_memory_fallback": ["10 per minute"]}, {}, FALLBACK),
        ({"RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True}, None, {}, FALLBACK),
    ],
    ids=[
        "swallow-config",
        "swallow-limiter",
        "swallow-environment",
        "fallback-config",
        "fallback-limits-config",
        "fallback-limiter",
        "fallback-limits-limiter",
        "fallback-config-no-limiter-yet",
    ],
)
def test_swallowing_storage_errors_or_falling_back_to_memory_is_refused(
    redis_env: dict[str, str],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, Any],
    options: dict[str, Any] | None,
    environ: dict[str, str],
    refused: str,
) -> None:
    """On a shared Redis storage: what happens when it fails must not lift or split the limit.
    ``options`` None: no Limiter registered (yet)."""
    for name, value in {**redis_env, **environ}.items():
        monkeypatch.setenv(name, value)
    app = _app(RATELIMIT_STORAGE_URI=redis_server.url, **config)
    if options is not None:
        _limit(app, **options)
    (problem,) = _refusal(app, None).problems
    assert problem.startswith(refused), problem
    if environ:  # Flask-Limiter itself reads app.config only
        return
    # Configured and registered after the store, the same Limiter is refused by check.
    app = _app()
    SessionStore(app, Settings.from_env(redis_env))
    app.config.update(RATELIMIT_STORAGE_URI=redis_server.url, **config)
    _limit(app, **(options or {}))
    result = _check(app)
    assert result.exit_code == 1
    assert refused in result.output


def test_memory_storage_is_accepted_in_development() -> None:
    app = _app(RATELIMIT_STORAGE_URI="memory://")
    _limit(app)
    SessionStore(app, Settings(environment="development"))
    assert _statuses(app, LIMIT + 1) == [200] * LIMIT + [429]
    result = _check(app)
    assert result.exit_code == 0, result.output
    assert "Rate-limit storage (Flask-Limiter): memory://." in result.output
    # The same app, checked for production before its deploy:
    production = _check(app, "--env", "production")
    assert production.exit_code == 1
    assert REFUSED_MEMORY in production.output


def test_a_shared_redis_storage_is_accepted_in_production_and_left_as_configured(
    redis_env: dict[str, str], redis_server: RedisServer
) -> None:
    config = {
        "RATELIMIT_STORAGE_URI": redis_server.url,
        "RATELIMIT_STORAGE_OPTIONS": TIMEOUTS,
        "RATELIMIT_SWALLOW_ERRORS": False,
    }
    app = _app(**config)
    _limit(app)
    SessionStore(app, Settings.from_env(redis_env))
    assert {name: app.config[name] for name in config} == config
    assert _statuses(app, LIMIT + 1) == [200] * LIMIT + [429]
    result = _check(app)
    assert result.exit_code == 0, result.output
    assert f"Rate-limit storage (Flask-Limiter): {redis_server.url}." in result.output


def test_limits_are_shared_across_two_processes(
    redis_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two gunicorns (two Cloud Run instances) on the session store's Redis: the (LIMIT+1)th
    request of one client gets 429 whichever process it reaches."""
    environ = {**redis_env, "LIMITER_APP_STORAGE_URI": redis_server.url}
    environ["LIMITER_APP_LIMIT"] = str(LIMIT)
    servers = [Gunicorn(tmp_path, environ, app="tests.limiter_app:app") for _ in range(2)]
    try:
        for server in servers:
            server.start()
        answers = [servers[n % 2].request("GET", "/limited") for n in range(LIMIT)]
        assert [status for status, _, _ in answers] == [200] * LIMIT
        pids = {body for _, _, body in answers}
        assert len(pids) == 2  # two processes answered
        assert [server.request("GET", "/limited")[0] for server in servers] == [429, 429]
    finally:
        for server in servers:
            server.stop()


def test_memory_limits_are_per_process_which_is_why_they_are_refused(tmp_path: Path) -> None:
    """The same two processes on memory:// (development): each counts alone, so one client
    makes twice the limit."""
    environ = {
        "ENV": "development",
        "SESSION_STORE_BACKEND": "memory",
        "LIMITER_APP_STORAGE_URI": "memory://",
        "LIMITER_APP_LIMIT": str(LIMIT),
    }
    servers = [Gunicorn(tmp_path, environ, app="tests.limiter_app:app") for _ in range(2)]
    try:
        for server in servers:
            server.start()
        statuses = [
            server.request("GET", "/limited")[0] for server in servers for _ in range(LIMIT)
        ]
        assert statuses == [200] * (2 * LIMIT)
    finally:
        for server in servers:
            server.stop()


def test_the_session_stores_redis_cluster_url_is_a_shared_storage(
    redis_env: dict[str, str], redis_cluster: RedisClusterNodes
) -> None:
    """REDIS_URL=redis+cluster://... serves as RATELIMIT_STORAGE_URI as it is: two apps (two
    Limiters, two cluster clients) share one count."""
    seeds = ",".join(f"127.0.0.1:{port}" for port in redis_cluster.ports[:2])
    url = f"redis+cluster://{seeds}"
    settings = Settings.from_env({**redis_env, "REDIS_URL": url})
    prefix = f"test-{uuid.uuid4().hex}"  # the cluster lives for the whole session
    apps = []
    for _ in range(2):
        app = _app(
            RATELIMIT_STORAGE_URI=url,
            RATELIMIT_STORAGE_OPTIONS=TIMEOUTS,
            RATELIMIT_KEY_PREFIX=prefix,
        )
        _limit(app)
        SessionStore(app, settings)
        apps.append(app)
    assert _statuses(apps[0], 3) + _statuses(apps[1], LIMIT - 3) == [200] * LIMIT
    assert _statuses(apps[0], 1) + _statuses(apps[1], 1) == [429, 429]


def test_a_storage_password_never_appears(redis_env: dict[str, str], tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password=RATE_LIMIT_PASSWORD)
    server.start()
    try:
        url = server.url
        assert RATE_LIMIT_PASSWORD in url
        settings = Settings.from_env(redis_env)
        shown = f"redis://***@127.0.0.1:{server.port}/0"

        # Refused at init, and by check (the Limiter registered after the store).
        bad = {"RATELIMIT_SWALLOW_ERRORS": True, "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True}
        app = _app(RATELIMIT_STORAGE_URI=url, **bad)
        _limit(app)
        error = _refusal(app, settings)
        assert len(error.problems) == 2
        for text in (str(error), repr(error), *error.problems):
            assert RATE_LIMIT_PASSWORD not in text
        app = _app()
        SessionStore(app, settings)
        app.config.update(RATELIMIT_STORAGE_URI=url, **bad)
        _limit(app)
        refused = _check(app)
        assert refused.exit_code == 1
        assert "RATELIMIT_SWALLOW_ERRORS" in refused.output
        assert RATE_LIMIT_PASSWORD not in refused.output

        # A per-process storage whose URI carries a password: shown redacted.
        memory = f"memory://:{RATE_LIMIT_PASSWORD}@localhost"
        app = _app(RATELIMIT_STORAGE_URI=memory)
        _limit(app)
        (problem,) = _refusal(app, settings).problems
        assert "RATELIMIT_STORAGE_URI=memory://***@localhost is refused" in problem
        assert RATE_LIMIT_PASSWORD not in problem

        # Accepted: the limit works on the password-protected server; check shows it redacted.
        app = _app(RATELIMIT_STORAGE_URI=url)
        _limit(app)
        SessionStore(app, settings)
        assert _statuses(app, LIMIT + 1) == [200] * LIMIT + [429]
        accepted = _check(app)
        assert accepted.exit_code == 0, accepted.output
        assert f"Rate-limit storage (Flask-Limiter): {shown}." in accepted.output
        assert RATE_LIMIT_PASSWORD not in accepted.output
        (storage,) = rate_limit_storages(app.config, [], {})
        assert RATE_LIMIT_PASSWORD not in repr(storage)
        assert repr(storage) == repr(RateLimitStorage(storage_uri=url))
    finally:
        server.stop()


def test_an_app_without_flask_limiter_is_not_concerned(redis_env: dict[str, str]) -> None:
    app = _app()
    SessionStore(app, Settings.from_env(redis_env))
    result = _check(app)
    assert result.exit_code == 0, result.output
    assert "Rate-limit" not in result.output
    assert SECRET not in result.output
