"""Apps for the lost-update tests, served by real gunicorn: each request loads the session,
waits (so requests of one session overlap), then writes its own key.

``tests.merge_app:ours()`` is this package's app from the environment;
``tests.merge_app:flask_session_defaults()`` is Flask-Session 0.8 on Redis as documented.
"""

from __future__ import annotations

import os
import time

from flask import Flask, request, session

from pyloto_corp import create_app


def _routes(app: Flask) -> Flask:
    @app.post("/seed")
    def seed() -> dict[str, bool]:
        session["seed"] = True
        return {"ok": True}

    @app.post("/keys/<name>")
    def put(name: str) -> dict[str, bool]:
        session.get("seed")  # the session as this request loaded it
        time.sleep(float(request.args.get("delay", "0.02")))
        session[name] = request.args.get("value", "1")
        return {"ok": True}

    @app.get("/keys")
    def keys() -> dict[str, dict[str, str]]:
        return {"keys": {k: v for k, v in session.items() if k.startswith("k")}}

    return app


def ours() -> Flask:
    return _routes(create_app())  # it serves /healthz already


def flask_session_defaults() -> Flask:
    import redis
    from flask_session import Session

    app = Flask("flask_session_defaults")
    app.config.update(
        SECRET_KEY=os.environ["SECRET_KEY"],
        SESSION_TYPE="redis",
        SESSION_REDIS=redis.Redis.from_url(os.environ["REDIS_URL"]),
    )
    Session(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return _routes(app)
