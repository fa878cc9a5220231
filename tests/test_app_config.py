"""The effective settings of an existing app: its own app.config first, never overwritten."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis
from flask import Flask, request
from werkzeug.middleware.proxy_fix import ProxyFix

from pyloto_corp import ConfigurationError, SessionStore, Settings
from pyloto_corp.config.app_config import effective_settings
from pyloto_corp.records.redis import options as redis_options
from pyloto_corp.session_store.extension import effective_proxy_hops
from tests.conftest import SECRET


def _config(**values: Any) -> dict[str, Any]:
    return {**Flask.default_config, **values}


def test_flask_defaults_leave_the_settings_alone() -> None:
    settings, problems = effective_settings(_config(), None, {})
    assert (settings, problems) == (Settings(), [])


def test_the_host_apps_own_flask_keys_are_used() -> None:
    settings, problems = effective_settings(
        _config(
            SECRET_KEY="the-app's-own-key",
            SESSION_COOKIE_NAME="my_sid",
            SESSION_COOKIE_SAMESITE="Strict",
            PERMANENT_SESSION_LIFETIME=timedelta(minutes=30),
        ),
        None,
        {},
    )
    assert problems == []
    assert settings.secret_key == "the-app's-own-key"
    assert settings.session_cookie_name == "my_sid"
    assert settings.session_cookie_samesite == "Strict"
    assert settings.session_lifetime == timedelta(minutes=30)


def test_permanent_session_lifetime_in_seconds_is_understood() -> None:
    settings, _ = effective_settings(_config(PERMANENT_SESSION_LIFETIME=1800), None, {})
    assert settings.session_lifetime == timedelta(seconds=1800)


def test_extension_keys_in_app_config_come_before_the_environment() -> None:
    settings, problems = effective_settings(
        _config(
            SESSION_STORE_BACKEND="Redis", REDIS_URL="redis://cache:6379/1", SESSION_LIFETIME=60
        ),
        None,
        {"SESSION_STORE_BACKEND": "memory", "REDIS_URL": "redis://other:6379", "ENV": "test"},
    )
    assert problems == []
    assert settings.environment == "test"
    assert settings.session_store_backend == "redis"
    assert settings.store == redis_options.Options(url="redis://cache:6379/1")
    assert settings.session_lifetime == timedelta(seconds=60)


def test_flask_session_keys_that_mean_the_same_are_honoured() -> None:
    settings, problems = effective_settings(
        _config(
            SESSION_TYPE="redis",
            REDIS_URL="redis://cache",
            SESSION_PERMANENT=False,
            SESSION_KEY_PREFIX="app:",
            SESSION_USE_SIGNER=False,
            SESSION_SERIALIZATION_FORMAT="msgpack",
        ),
        None,
        {},
    )
    assert problems == []
    assert settings.session_store_backend == "redis"
    assert settings.session_permanent is False
    assert settings.session_key_prefix == "app:"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("SESSION_TYPE", "filesystem", "app.config['SESSION_TYPE'] (Flask-Session) is not"),
        ("SESSION_USE_SIGNER", True, "app.config['SESSION_USE_SIGNER'] (Flask-Session)"),
        ("SESSION_CLEANUP_N_REQUESTS", 100, "SESSION_CLEANUP_N_REQUESTS"),
        ("SESSION_SERIALIZATION_FORMAT", "json", "SESSION_SERIALIZATION_FORMAT"),
        ("SESSION_FILE_DIR", "/tmp/s", "SESSION_FILE_DIR"),
        ("SESSION_REFRESH_EACH_REQUEST", False, "SESSION_REFRESH_EACH_REQUEST"),
        ("SESSION_LIFETIME", object(), "app.config['SESSION_LIFETIME'] is a object"),
    ],
)
def test_keys_that_cannot_be_honoured_are_refused_by_name(
    key: str, value: object, fragment: str
) -> None:
    _, problems = effective_settings(_config(**{key: value}), None, {})
    assert len(problems) == 1
    assert fragment in problems[0]


def test_a_value_set_twice_differently_is_refused_not_chosen() -> None:
    _, problems = effective_settings(
        _config(SESSION_COOKIE_NAME="my_sid"), None, {"SESSION_COOKIE_NAME": "other"}
    )
    assert problems == [
        "app.config['SESSION_COOKIE_NAME'] and SESSION_COOKIE_NAME (from the environment or the "
        "Settings) disagree; set it in one place."
    ]
    _, problems = effective_settings(
        _config(REDIS_URL="redis://a"),
        Settings(session_store_backend="redis", store=redis_options.Options(url="redis://b")),
        {},
    )
    assert problems == [
        "app.config['REDIS_URL'] is set, and so are the Settings passed to init_app(); "
        "configure the session store in one place."
    ]


def test_init_app_keeps_the_apps_secret_key_and_cookie_name() -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k" * 40, SESSION_COOKIE_NAME="my_sid")
    SessionStore(app, Settings(environment="test"))
    assert app.config["SECRET_KEY"] == "k" * 40
    assert app.config["SESSION_COOKIE_NAME"] == "my_sid"
    response = app.test_client().get("/")
    assert response.status_code == 404
    assert app.session_interface.get_cookie_name(app) == "my_sid"


def test_init_app_refuses_insecure_host_cookies_in_production() -> None:
    app = Flask(__name__)
    app.config.update(
        ENV="production",
        SECRET_KEY=SECRET,
        SESSION_COOKIE_SAMESITE="None",
        SESSION_COOKIE_HTTPONLY=False,
        SESSION_STORE_BACKEND="redis",
        REDIS_URL="redis://cache",
    )
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(app, None)
    assert caught.value.problems == (
        "SESSION_COOKIE_HTTPONLY=false is refused in production: scripts must not read the "
        "session cookie; remove the setting.",
        "SESSION_COOKIE_SAMESITE must be Lax or Strict in production.",
    )


def test_flask_sessions_interface_already_installed_is_refused() -> None:
    from flask_session import Session

    app = Flask(__name__)
    app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis())
    Session(app)
    with pytest.raises(RuntimeError, match="Flask-Session's Session"):
        SessionStore(app, Settings(environment="test"))


def _host_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)

    @app.get("/_seen")
    def seen() -> dict[str, str | None]:
        return {"scheme": request.scheme, "remote_addr": request.remote_addr}

    return app


FORWARDED = {"X-Forwarded-Proto": "https, https", "X-Forwarded-For": "198.51.100.7, 203.0.113.9"}


def _seen(app: Flask) -> dict[str, str]:
    seen: dict[str, str] = app.test_client().get("/_seen", headers=FORWARDED).get_json()
    return seen


@pytest.mark.parametrize(
    ("hops", "seen"),
    [
        (0, {"scheme": "http", "remote_addr": "127.0.0.1"}),
        (1, {"scheme": "https", "remote_addr": "203.0.113.9"}),
        (2, {"scheme": "https", "remote_addr": "198.51.100.7"}),
    ],
)
def test_a_host_apps_trusted_proxy_hops_are_applied(hops: int, seen: dict[str, str]) -> None:
    app = _host_app(TRUSTED_PROXY_HOPS=hops)
    SessionStore(app)
    assert _seen(app) == seen
    assert SessionStore.state(app).settings.proxy_hops == hops
    assert effective_proxy_hops(app) == hops


def test_trusted_proxy_hops_from_the_environment_apply_to_a_host_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRUSTED_PROXY_HOPS", "1")
    app = _host_app()
    SessionStore(app)
    assert _seen(app) == {"scheme": "https", "remote_addr": "203.0.113.9"}


def test_a_host_apps_own_proxy_fix_is_kept_not_wrapped_twice() -> None:
    app = _host_app()
    own = ProxyFix(app.wsgi_app, x_for=2, x_proto=1)
    app.wsgi_app = own  # type: ignore[method-assign]
    # On Cloud Run, where one hop would be trusted by default.
    SessionStore(
        app,
        Settings(
            environment="production",
            cloud_run_service="api",
            secret_key=SECRET,
            session_store_backend="redis",
            store=redis_options.Options(url="redis://127.0.0.1:1"),
        ),
    )
    assert app.wsgi_app is own
    assert _seen(app) == {"scheme": "https", "remote_addr": "198.51.100.7"}
    assert effective_proxy_hops(app) == "x_for=2, x_proto=1 (the app's own ProxyFix)"


def test_a_proxy_fix_the_host_adds_after_init_app_decides_alone() -> None:
    """Wrapped later, the host's ProxyFix runs first; ours then leaves the request alone
    instead of applying its own count on top."""
    app = _host_app()
    SessionStore(app, Settings(environment="test", trusted_proxy_hops=1))
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=2, x_proto=2)  # type: ignore[method-assign]
    assert _seen(app) == {"scheme": "https", "remote_addr": "198.51.100.7"}
    assert effective_proxy_hops(app) == 2


def test_trusted_proxy_hops_contradicting_the_hosts_proxy_fix_are_refused() -> None:
    app = _host_app(TRUSTED_PROXY_HOPS=1)
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=2, x_proto=2)  # type: ignore[method-assign]
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(app)
    assert caught.value.problems == (
        "TRUSTED_PROXY_HOPS is set and app.wsgi_app is already wrapped in a ProxyFix "
        "(x_for=2, x_proto=2) that decides otherwise; configure proxies in one place.",
    )
    agreeing = _host_app(TRUSTED_PROXY_HOPS=2)
    agreeing.wsgi_app = ProxyFix(agreeing.wsgi_app, x_for=2, x_proto=2)  # type: ignore[method-assign]
    SessionStore(agreeing)
    assert effective_proxy_hops(agreeing) == 2
