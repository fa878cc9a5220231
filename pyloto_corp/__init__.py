"""pyloto_corp: a Flask foundation with server-side sessions that are safe on Cloud Run."""

from __future__ import annotations

from .app import create_app
from .config.settings import Settings
from .errors import ConfigurationError
from .session_store import SessionStore

__all__ = ["ConfigurationError", "SessionStore", "Settings", "create_app"]
