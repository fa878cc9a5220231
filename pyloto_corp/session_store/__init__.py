"""Server-side session stores for Flask on Cloud Run, built on Flask-Session.

Backends live one per module (``memory``, ``redis``, ``firestore``) and are imported only when
chosen, so a Redis deployment never pays for importing google.cloud.
"""

from __future__ import annotations

from .base import UserSession
from .extension import EXTENSION_KEY, SessionStore, StoreState
from .lifecycle import (
    end_session,
    revoke_session,
    revoke_user_sessions,
    rotate_session_id,
    user_sessions,
)

__all__ = [
    "EXTENSION_KEY",
    "SessionStore",
    "StoreState",
    "UserSession",
    "end_session",
    "revoke_session",
    "revoke_user_sessions",
    "rotate_session_id",
    "user_sessions",
]
