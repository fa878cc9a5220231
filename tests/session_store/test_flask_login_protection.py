"""Flask-Login's "strong" session protection works on our store as on Flask's cookie session.

Flask-Login applies "strong" only to non-permanent sessions (a permanent one is just marked not
fresh), and Flask's sessions are non-permanent unless the app says otherwise: ours follow the
same promise. Each test runs the same steps on Flask's own cookie session first, so the expected
answer is what Flask-Login does there.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask, session
from flask_login import LoginManager, UserMixin, current_user, login_fresh, login_user

from tests.session_store.conftest import Harness


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def _with_login(app: Flask) -> Flask:
    app.config["SESSION_PROTECTION"] = "strong"
    manager = LoginManager(app)

    @manager.user_loader
    def load(user_id: str) -> User:
        return User(user_id)

    @app.get("/login")
    def login() -> str:
        session["foo"] = "bar"
        return str(login_user(User("notch")))

    @app.get("/login-permanent")
    def login_permanent() -> str:
        session.permanent = True
        return str(login_user(User("notch")))

    @app.get("/state")
    def state() -> dict[str, object]:
        user = current_user.id if current_user.is_authenticated else None
        return {"user": user, "fresh": login_fresh(), "foo": session.get("foo")}

    return app


def _cookie_app() -> Flask:
    app = Flask("flask_cookie_session")
    app.config["SECRET_KEY"] = "flask-cookie-session-" + "k" * 32
    return _with_login(app)


def _both(backend: Harness) -> list[Flask]:
    return [_cookie_app(), _with_login(backend.make())]


def _states(app: Flask, login: str) -> list[dict[str, object]]:
    client = app.test_client()
    client.get(login)
    return [
        client.get("/state").json,
        client.get("/state", headers={"User-Agent": "another browser"}).json,
        client.get("/state").json,
    ]


def test_strong_protection_signs_out_a_session_used_from_another_browser(
    backend: Harness,
) -> None:
    flask_states, our_states = (_states(app, "/login") for app in _both(backend))
    assert flask_states == [
        {"user": "notch", "fresh": True, "foo": "bar"},
        {"user": None, "fresh": False, "foo": "bar"},
        {"user": None, "fresh": False, "foo": "bar"},
    ]
    assert our_states == flask_states


def test_strong_protection_marks_a_permanent_session_not_fresh(backend: Harness) -> None:
    flask_states, our_states = (_states(app, "/login-permanent") for app in _both(backend))
    assert flask_states[1] == {"user": "notch", "fresh": False, "foo": None}
    assert our_states == flask_states


@pytest.mark.parametrize("permanent", [False, True])
def test_session_permanent_setting_decides_the_default(
    make_app: Callable[..., Flask], permanent: bool
) -> None:
    app = make_app(ENV="test", SESSION_PERMANENT=str(permanent).lower())
    header = app.test_client().post("/session/counter").headers["Set-Cookie"]
    assert ("Expires=" in header) is permanent
