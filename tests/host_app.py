"""An existing Flask app that adopts SessionStore the way real users do.

It sets its own configuration first (its own ``SECRET_KEY`` and cookie name), then registers
``SessionStore(app)`` with no Settings argument (so the extension reads ``app.config`` first, then
the environment), then Flask-Login and Flask-WTF's CSRF protection, as usual.

``gunicorn -c gunicorn.conf.py 'tests.host_app:wsgi()'`` serves it; the configuration the
extension needs comes from the environment (``SESSION_STORE_BACKEND``, ``REDIS_URL``, ...).
"""

from __future__ import annotations

import os

from flask import Flask, Response, flash, get_flashed_messages, request
from flask_login import (
    LoginManager,
    UserMixin,
    current_user,
    fresh_login_required,
    login_fresh,
    login_user,
    logout_user,
)
from flask_wtf.csrf import CSRFProtect, generate_csrf
from markupsafe import Markup

from pyloto_corp.session_store import SessionStore
from pyloto_corp.session_store.lifecycle import end_session, rotate_session_id

#: The host app's own signing key (not the extension's, not the environment's).
HOST_SECRET_KEY = "host-app-own-secret-key-" + "0123456789abcdef" * 2
#: The host app's own session cookie name.
HOST_COOKIE_NAME = "my_sid"
#: The variables the WSGI entry point passes from the environment into ``app.config``.
PASSED_THROUGH = ("SESSION_STORE_BACKEND", "REDIS_URL", "ENV", "SECRET_KEY")


class User(UserMixin):
    """A user known by name only; any name may log in."""

    def __init__(self, user_id: str) -> None:
        self.id = user_id


USERS: dict[str, User] = {}


def _user(user_id: str) -> User:
    return USERS.setdefault(user_id, User(user_id))


def create_host_app(config: dict[str, object] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=HOST_SECRET_KEY,
        SESSION_COOKIE_NAME=HOST_COOKIE_NAME,
        WTF_CSRF_ENABLED=True,
    )
    app.config.update(config or {})

    SessionStore(app)

    login_manager = LoginManager(app)

    @login_manager.user_loader
    def load_user(user_id: str) -> User | None:
        return _user(user_id)

    CSRFProtect(app)

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @app.get("/form")
    def form() -> str:
        return generate_csrf()

    @app.post("/login")
    def login() -> dict[str, object]:
        user = _user(request.form["user"])
        rotate_session_id()
        login_user(user, remember=request.form.get("remember") == "1")
        flash(Markup("Welcome <b>back</b>"), "info")
        return {"user": user.id}

    @app.get("/me")
    def me() -> dict[str, object]:
        flashes = get_flashed_messages(with_categories=True)
        return {
            "user": current_user.id if current_user.is_authenticated else "anonymous",
            # Each entry as Flask stored it: a (category, message) tuple, the message a Markup
            # when the view flashed one.
            "flashes": [
                {
                    "category": entry[0],
                    "message": str(entry[1]),
                    "markup": type(entry[1]) is Markup,
                    "tuple": type(entry) is tuple,
                }
                for entry in flashes
            ],
            "fresh": login_fresh(),
        }

    @app.post("/logout")
    def logout() -> dict[str, object]:
        end_session()
        logout_user()
        flash("Signed out")
        return {"user": "anonymous"}

    @app.post("/fresh-only")
    @fresh_login_required
    def fresh_only() -> dict[str, object]:
        return {"user": current_user.id}

    @app.after_request
    def worker_pid(response: Response) -> Response:
        # Which process answered: lets a test see that every gunicorn worker served requests.
        response.headers["X-Worker-Pid"] = str(os.getpid())
        return response

    return app


def wsgi() -> Flask:
    """The app gunicorn serves (``tests.host_app:wsgi()``), configured from the environment."""
    return create_host_app(
        {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    )
