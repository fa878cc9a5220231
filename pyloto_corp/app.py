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
    hops = settings.proxy_hops
    if hops:
        # Cloud Run's front end terminates TLS: trust its X-Forwarded-For and -Proto so the app
        # sees https and the client's address. Nowhere else by default: there the headers could
        # be forged. Never X-Forwarded-Host: Cloud Run does not set it (Host is already the
        # client's), so a client's own value would reach url_for(..., _external=True).
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    SessionStore(app, settings)
    app.register_blueprint(bp)
    return app
