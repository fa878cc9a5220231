"""The application factory."""

from __future__ import annotations

from flask import Flask

from .config.settings import Settings
from .session_store import SessionStore
from .views import bp


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; settings come from the environment when None.

    Raises :class:`~pyloto_corp.errors.ConfigurationError` (a ``ValueError``) listing every
    configuration problem, before any request is served.
    """
    settings = Settings.from_env() if settings is None else settings
    app = Flask(__name__)
    SessionStore(app, settings)
    app.register_blueprint(bp)
    return app
