"""The real app (settings from the environment) plus one route that shows what it believes
about the request, so tests can serve it with gunicorn and check which forwarded headers
were trusted: ``gunicorn -c gunicorn.conf.py 'tests.proxy_app:factory()'``; and the same route on a
host app that registers ``SessionStore(app)`` itself: ``'tests.proxy_app:host()'``."""

from __future__ import annotations

from flask import Flask, current_app, request, url_for

from pyloto_corp import ConfigurationError, SessionStore, create_app


def request_view() -> dict[str, str | None]:
    """The external URL the app would build, the scheme and the client address it sees."""
    endpoint = "pyloto_corp.healthz"
    if endpoint not in current_app.view_functions:
        endpoint = "healthz"
    return {
        "external": url_for(endpoint, _external=True),
        "scheme": request.scheme,
        "remote_addr": request.remote_addr,
    }


def _with_view(app: Flask) -> Flask:
    app.add_url_rule("/_test/url", view_func=request_view)
    return app


def host() -> Flask:
    """A host app of its own: no factory, ``SessionStore(app)`` reads the environment."""
    app = Flask("host")
    try:
        SessionStore(app)
    except ConfigurationError as exc:
        raise SystemExit(f"Error: {exc}") from None
    app.add_url_rule("/healthz", "healthz", lambda: {"status": "ok"})
    return _with_view(app)


def factory() -> Flask:
    """``create_app()``, as ``wsgi.py`` serves it."""
    try:
        app = create_app()
    except ConfigurationError as exc:  # as wsgi.py: the message, not a traceback
        raise SystemExit(f"Error: {exc}") from None
    return _with_view(app)
