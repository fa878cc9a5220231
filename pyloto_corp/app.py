"""The application factory."""

from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

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
    if settings.is_deployed:
        # Cloud Run's front end terminates TLS and is the one proxy hop: trust its X-Forwarded-*
        # so url_for and Secure cookies see https.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    SessionStore(app, settings)
    app.register_blueprint(bp)
    return app
