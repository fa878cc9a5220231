"""create_app: the bootstrap table and a real round trip."""

from __future__ import annotations

import pytest
import redis
from flask import Flask

from pyloto_corp import ConfigurationError, SessionStore, Settings, create_app
from pyloto_corp.config.settings import Var
from tests.conftest import SECRET, MakeApp, cookie_name


def test_create_app_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(Var.ENV, "production")
    monkeypatch.setenv(Var.SESSION_STORE_BACKEND, "MEMORY")
    monkeypatch.setenv(Var.SECRET_KEY, SECRET)
    with pytest.raises(ValueError, match="memory is refused in production"):
        create_app()


def test_development_with_memory_starts(make_app: MakeApp) -> None:
    app = make_app(ENV="development")
    assert app.test_client().get("/healthz").json == {"status": "ok"}


def test_production_with_redis_starts(make_app: MakeApp, redis_env: dict[str, str]) -> None:
    app = make_app(**redis_env)
    assert app.test_client().get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("environ", "environment", "fragment"),
    [
        ({Var.ENV: "production"}, "production", "memory is refused in production"),
        ({Var.ENV: "staging"}, "staging", "memory is refused in staging"),
        (
            {Var.ENV: "prod", Var.SESSION_STORE_BACKEND: "postgres"},
            "production",
            "SESSION_STORE_BACKEND is not a session store backend",
        ),
        ({Var.K_SERVICE: "api"}, "development", "refused on Cloud Run"),
    ],
)
def test_bad_configurations_fail_at_create_app(
    make_app: MakeApp, environ: dict[str, str], environment: str, fragment: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make_app(**environ, SECRET_KEY=SECRET)
    assert f"environment '{environment}'" in str(caught.value)
    assert fragment in str(caught.value)
    assert SECRET not in str(caught.value)


def test_an_unknown_environment_is_refused_without_repeating_it(make_app: MakeApp) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make_app(ENV="prodution", SESSION_STORE_BACKEND="postgres")
    assert str(caught.value).startswith(
        "Invalid configuration for an unknown environment (2 problems):\n"
        "  - ENV is not a known environment; use one of: "
    )
    assert "prodution" not in str(caught.value)
    assert "postgres" not in str(caught.value)
    assert caught.value.environment == "unknown"


def test_redis_password_never_in_the_error(make_app: MakeApp) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make_app(
            ENV="production",
            SESSION_STORE_BACKEND="redis",
            REDIS_URL="redis://:p4ss-w0rd-xyz@cache:6379/0",
            REDIS_SOCKET_TIMEOUT="0",
            SECRET_KEY="too-short-secret",
        )
    message = str(caught.value)
    assert "REDIS_SOCKET_TIMEOUT" in message
    assert "SECRET_KEY is too short" in message
    assert "p4ss-w0rd-xyz" not in message
    assert "too-short-secret" not in message


def _counter_round_trip(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/session/counter").json == {"counter": 0}
    assert client.post("/session/counter").json == {"counter": 1}
    assert client.post("/session/counter").json == {"counter": 2}
    assert client.get("/session/counter").json == {"counter": 2}


def test_round_trip_through_real_redis(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis
) -> None:
    app = make_app(**redis_env)
    _counter_round_trip(app)
    keys = redis_client.keys("session:*")
    assert len(keys) == 1


@pytest.mark.parametrize(("backend", "shared"), [("redis", True), ("memory", False)])
def test_a_second_instance_sees_the_session_only_with_a_shared_store(
    make_app: MakeApp, request: pytest.FixtureRequest, backend: str, shared: bool
) -> None:
    """Two apps (two Cloud Run instances): Redis shares the session, memory splits it."""
    environ = request.getfixturevalue("redis_env") if shared else {"ENV": "development"}
    first, second = make_app(**environ), make_app(**environ)
    client = first.test_client()
    client.post("/session/counter")
    cookie = client.get_cookie(cookie_name(first))
    assert cookie is not None
    other = second.test_client()
    other.set_cookie(cookie_name(second), cookie.value)
    assert other.get("/session/counter").json == {"counter": 1 if shared else 0}


@pytest.mark.parametrize(
    ("environ", "scheme"),
    [
        ({"K_SERVICE": "api"}, "https"),
        ({}, "http"),
        ({"TRUSTED_PROXY_HOPS": "1"}, "https"),
        ({"K_SERVICE": "api", "TRUSTED_PROXY_HOPS": "0"}, "http"),
    ],
)
def test_forwarded_headers_are_trusted_only_behind_a_known_proxy(
    make_app: MakeApp, redis_env: dict[str, str], environ: dict[str, str], scheme: str
) -> None:
    app = make_app(**redis_env, **environ)

    @app.get("/scheme")
    def current_scheme() -> dict[str, str]:
        from flask import request

        return {"scheme": request.scheme}

    headers = {"X-Forwarded-Proto": "https"}
    assert app.test_client().get("/scheme", headers=headers).json == {"scheme": scheme}


def test_the_factory_app_caps_request_bodies(make_app: MakeApp) -> None:
    """A body over 1 MiB is answered 413 before a view reads it (Werkzeug buffers form and JSON
    bodies in memory): the demo routes cannot be used to fill an instance's memory."""
    app = make_app(ENV="development")
    assert app.config["MAX_CONTENT_LENGTH"] == 1024 * 1024
    client = app.test_client()
    big = b'{"user": "' + b"a" * (1024 * 1024) + b'"}'
    response = client.post("/session/login", data=big, content_type="application/json")
    assert response.status_code == 413
    small = client.post("/session/login", json={"user": "ana"})
    assert small.status_code == 200


def test_a_host_apps_own_body_limit_is_kept() -> None:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    SessionStore(app, Settings(environment="test"))
    assert app.config["MAX_CONTENT_LENGTH"] == 16 * 1024 * 1024
    unlimited = Flask(__name__)
    SessionStore(unlimited, Settings(environment="test"))
    assert unlimited.config["MAX_CONTENT_LENGTH"] is None


def test_on_cloud_run_without_env_the_cookie_is_secure(
    make_app: MakeApp, redis_env: dict[str, str]
) -> None:
    """K_SERVICE alone (ENV left unset) makes the instance deployed: Secure, HttpOnly, Lax."""
    environ = {**redis_env, Var.K_SERVICE: "api"}
    del environ[Var.ENV]
    app = make_app(**environ)
    response = app.test_client().post("/session/counter")
    cookie = response.headers["Set-Cookie"]
    assert "; Secure" in cookie
    assert "; HttpOnly" in cookie
    assert "; SameSite=Lax" in cookie
    with pytest.raises(ConfigurationError, match="SESSION_COOKIE_SECURE=false is refused on Cloud"):
        make_app(**environ, SESSION_COOKIE_SECURE="false")
