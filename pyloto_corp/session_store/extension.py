"""The ``SessionStore`` Flask extension: validate the settings, then bind Flask-Session."""

from __future__ import annotations

import importlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app
from flask_session.base import ServerSideSessionInterface

from ..config.settings import Settings, Var
from ..errors import ConfigurationError, SessionStoreUnavailable
from .base import answer_store_unavailable

logger = logging.getLogger("pyloto_corp.session_store")

EXTENSION_KEY = "pyloto_session_store"


@dataclass(frozen=True)
class StoreState:
    """What one app's registration holds, in ``app.extensions[EXTENSION_KEY]``."""

    settings: Settings
    interface: ServerSideSessionInterface


class SessionStore:
    """Server-side sessions that survive Cloud Run's stateless instances.

    ``init_app`` validates the settings for their environment and raises one
    :class:`~pyloto_corp.errors.ConfigurationError` listing every problem before the app serves
    anything; then it configures Flask's cookie settings and installs the backend's interface.
    """

    def __init__(
        self, app: Flask | None = None, settings: Settings | None = None, *, client: Any = None
    ) -> None:
        if app is not None:
            self.init_app(app, settings, client=client)

    def init_app(self, app: Flask, settings: Settings | None = None, *, client: Any = None) -> None:
        """Register on ``app``; ``client`` replaces the backend client built from the settings."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "SessionStore is already registered on this app; call init_app once per app."
            )
        settings = Settings.from_env() if settings is None else settings
        problems = settings.validate()
        if problems:
            raise ConfigurationError(settings.environment, problems)

        self._configure_flask(app, settings)
        backend = importlib.import_module(f"{__package__}.{settings.session_store_backend}")
        interface = backend.create_interface(app, settings, client)
        app.session_interface = interface
        # A view that uses the session while the store is down gets a 503, not a 500.
        app.register_error_handler(SessionStoreUnavailable, answer_store_unavailable)
        app.extensions[EXTENSION_KEY] = StoreState(settings=settings, interface=interface)

    @staticmethod
    def _configure_flask(app: Flask, settings: Settings) -> None:
        secret_key = settings.secret_key
        if not secret_key:
            # Only reachable outside staging/production/Cloud Run (validation requires it there).
            secret_key = secrets.token_urlsafe(48)
            logger.warning(
                "%s is not set; using a random key for this process (%s only).",
                Var.SECRET_KEY,
                settings.environment,
            )
        app.config.update(
            SECRET_KEY=secret_key,
            SESSION_COOKIE_NAME=settings.session_cookie_name,
            SESSION_COOKIE_SECURE=settings.cookie_secure,
            SESSION_COOKIE_HTTPONLY=settings.session_cookie_httponly,
            SESSION_COOKIE_SAMESITE=settings.session_cookie_samesite,
            PERMANENT_SESSION_LIFETIME=settings.session_lifetime,
            SESSION_REFRESH_EACH_REQUEST=True,
        )

    @staticmethod
    def state(app: Flask | None = None) -> StoreState:
        """The registration of ``app`` (the current app by default)."""
        target = current_app if app is None else app
        try:
            state: StoreState = target.extensions[EXTENSION_KEY]
        except KeyError:
            raise RuntimeError(
                "SessionStore is not registered on this app; call SessionStore().init_app(app)."
            ) from None
        return state
