"""The application factory."""

from __future__ import annotations

from typing import Final

from flask import Flask

from .config.settings import Settings
from .session_store import SessionStore
from .views import bp

#: The largest request body the factory's app reads (its routes take a few bytes of JSON):
#: Werkzeug buffers form and JSON bodies in memory, so a bigger one is answered 413.
MAX_CONTENT_LENGTH: Final = 1024 * 1024


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; settings come from the environment when None.

    Raises :class:`~pyloto_corp.errors.ConfigurationError` (a ``ValueError``) listing every
    configuration problem, before any request is served. ``SessionStore`` installs the trusted
    proxies (``TRUSTED_PROXY_HOPS``), for this app as for any host app.
    """
    settings = Settings.from_env() if settings is None else settings
    app = Flask(__name__)
    if app.config.get("MAX_CONTENT_LENGTH") is None:
        app.config["MAX_CONTENT_LENGTH"] = MAX_CONTENT_LENGTH
    SessionStore(app, settings)
    app.register_blueprint(bp)
    return app
