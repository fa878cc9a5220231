"""The calls an app makes around authentication (OWASP session management).

``rotate_session_id()`` at login and at any change of privilege: the session moves to a new
random id; the new record is written at the end of the request and only then is the old id
deleted, so an id an attacker planted or saw before login is worthless after it, and a login that
fails (503, too large) leaves the pre-login session as it was. The absolute timeout starts again.

``end_session()`` at logout: the stored session is deleted now, and the session moves to a new,
empty id, so nothing written later in the request (``flash("Signed out")``) or by a request
already running brings the old id back. Flask-Login users: call it before ``logout_user()``.

``user_sessions(user_id)`` and ``revoke_user_sessions(user_id)``: every session whose
``SESSION_USER_KEY`` (Flask-Login's ``_user_id`` by default) holds ``user_id``, listed or ended
at once (a password change, a compromised account, "sign out other devices"). A revoke stores a
per-user mark that every later read of the user's sessions checks, so it holds for sessions no
listing found.
"""

from __future__ import annotations

from flask import current_app, has_request_context, session

from ..records.base import UserSession
from .base import StoreInterface, StoreSession


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


def user_sessions(user_id: object) -> list[UserSession]:
    """The live sessions of ``user_id``, oldest first: an opaque handle, when each began and
    when it was last used; never a session id or a store key."""
    interface = _interface()
    lifetime = current_app.permanent_session_lifetime
    with interface.breaker.guard():  # logged, and failing fast, like the request path
        found = interface.records.find_user_sessions(str(user_id), lifetime)
    return sorted(found.values(), key=lambda item: (item.created_at, item.handle))


def _current_session(interface: StoreInterface) -> StoreSession | None:
    if not has_request_context():
        return None
    current = session._get_current_object()  # type: ignore[attr-defined]
    return current if isinstance(current, StoreSession) else None


def revoke_user_sessions(user_id: object, *, keep_current: bool = False) -> int:
    """End every session of ``user_id`` (but the current request's, with ``keep_current``);
    how many were deleted. Final: a session the index missed (lost, evicted, or a login racing
    the revoke) ends at its next request, and a request of a revoked session that is already
    running cannot write it back (a write answers 409), the current request's included: after
    a password change keep the current session (``keep_current=True``) and rotate its id."""
    interface = _interface()
    current = _current_session(interface) if keep_current else None
    with interface.breaker.guard():
        return interface.end_user_sessions(str(user_id), current)


def revoke_session(user_id: object, handle: str) -> bool:
    """End one session of ``user_id``, named by a handle from ``user_sessions()`` (a "sign out
    this device" button); False when no live session of that user has that handle."""
    interface = _interface()
    user = str(user_id)
    with interface.breaker.guard():
        for store_id, found in interface.records.find_user_sessions(
            user, current_app.permanent_session_lifetime
        ).items():
            if found.handle == handle:
                interface.records.delete(store_id)
                interface.records.unindex(store_id, user)
                return True
    return False
