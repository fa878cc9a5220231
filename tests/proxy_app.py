"""The real app (settings from the environment) plus one route that shows what it believes
about the request, so tests can serve it with gunicorn and check which forwarded headers
were trusted: ``gunicorn -c gunicorn.conf.py tests.proxy_app:app``."""

from __future__ import annotations

from flask import request, url_for

from pyloto_corp import ConfigurationError, create_app

try:
    app = create_app()
except ConfigurationError as exc:  # as wsgi.py: the message, not a traceback
    raise SystemExit(f"Error: {exc}") from None


@app.get("/_test/url")
def request_view() -> dict[str, str | None]:
    """The external URL the app would build, the scheme and the client address it sees."""
    return {
        "external": url_for("pyloto_corp.healthz", _external=True),
        "scheme": request.scheme,
        "remote_addr": request.remote_addr,
    }
