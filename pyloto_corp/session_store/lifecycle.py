"""The two calls an app makes around authentication (OWASP session management).

``rotate_session_id()`` at login and at any change of privilege: the stored session moves to a
new random id and the old id is deleted from the store, so an id an attacker planted or saw
before login is worthless after it. ``end_session()`` at logout: the stored session is deleted
on the server and the cookie removed; a request still running cannot bring it back.
"""

from __future__ import annotations

from flask import current_app, session

from .base import StoreInterfaceMixin


def rotate_session_id() -> None:
    """Issue a new session id for the current session, deleting the old one from the store."""
    interface = current_app.session_interface
    if not isinstance(interface, StoreInterfaceMixin):
        raise RuntimeError("rotate_session_id() needs SessionStore registered on the app.")
    if not session:
        # Nothing stored under the current id: make sure it is written under a new one anyway.
        session.modified = True
        session.sid = interface._generate_sid(interface.sid_length)  # type: ignore[attr-defined]
        return
    interface.regenerate(session)


def end_session() -> None:
    """Log out: delete the stored session and the cookie (at the end of this request)."""
    session.clear()
