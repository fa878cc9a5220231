"""An app rate-limited by Flask-Limiter, for tests/test_rate_limits.py: served by two gunicorns
at once (the limit is shared through the storage, or not) and loaded by ``flask session-store
check``. The Limiter is registered after SessionStore, its storage given to its constructor
(``LIMITER_APP_STORAGE_URI``; the limit: ``LIMITER_APP_LIMIT`` a minute), so SessionStore's
init cannot see it: only ``check`` can."""

from __future__ import annotations

import os

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from pyloto_corp import SessionStore

#: Requests per minute one client may make to /limited, whichever process answers.
LIMIT = int(os.environ["LIMITER_APP_LIMIT"])

app = Flask(__name__)
SessionStore(app)  # the session store's settings from the environment
limiter = Limiter(get_remote_address, app=app, storage_uri=os.environ["LIMITER_APP_STORAGE_URI"])


@app.get("/healthz")
@limiter.exempt
def healthz() -> dict[str, bool]:
    return {"ok": True}


@app.get("/limited")
@limiter.limit(f"{LIMIT} per minute")
def limited() -> dict[str, int]:
    return {"pid": os.getpid()}
