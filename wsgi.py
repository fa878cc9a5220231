"""WSGI entry point for gunicorn (``wsgi:app``) and ``flask --app wsgi``.

A configuration error exits with its one-paragraph message instead of a traceback.
"""

from __future__ import annotations

from pyloto_corp import ConfigurationError, create_app

try:
    app = create_app()
except ConfigurationError as exc:
    raise SystemExit(f"Error: {exc}") from None
