"""Server-side sessions for Flask on Cloud Run: Flask-Session's interface on the app's record
store (``pyloto_corp.records``).

Backends live in ``pyloto_corp.records``, one module each, imported only when chosen, so a Redis
deployment never pays for importing google.cloud.
"""

from __future__ import annotations

from ..records.base import UserSession
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
