"""The two calls an app makes around authentication (OWASP session management).

``rotate_session_id()`` at login and at any change of privilege: the session moves to a new
random id; the new record is written at the end of the request and only then is the old id
deleted, so an id an attacker planted or saw before login is worthless after it, and a login that
fails (503, too large) leaves the pre-login session as it was. The absolute timeout starts again.

``end_session()`` at logout: the stored session is deleted now, and the session moves to a new,
empty id, so nothing written later in the request (``flash("Signed out")``) or by a request
already running brings the old id back. Flask-Login users: call it before ``logout_user()``.
"""

from __future__ import annotations

from flask import current_app, session

from .base import StoreInterface


def _interface() -> StoreInterface:
    interface = current_app.session_interface
    if not isinstance(interface, StoreInterface):
        raise RuntimeError("This needs SessionStore registered on the app (SessionStore(app)).")
    return interface


def rotate_session_id() -> None:
    """Issue a new session id for the current session (login); see the module docstring."""
    _interface().regenerate(session)


def end_session() -> None:
    """Log out now: delete the stored session; the cookie goes at the end of the request."""
    _interface().end(session)
